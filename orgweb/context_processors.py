"""The portal's switcher between "me" and each organization the user belongs to."""

from orgs.selectors import memberships_of


def switcher(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    # Lazy: pages that render no switcher (the API never renders templates) pay no query.
    return {"my_memberships": lambda: list(memberships_of(user=user))}
