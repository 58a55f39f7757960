from django.conf import settings


def site(request):
    return {"APP_TITLE": settings.APP_TITLE, "APP_URL": settings.APP_URL}
