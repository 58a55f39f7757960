"""``{% tokentill_dashboard %}``: the staff dashboard panels on the admin index.

A template tag because the admin index is the stock ``admin.site`` view; the figures come from
``backoffice.dashboard`` (which reads through ``backoffice.selectors``)."""

from django import template

from backoffice.dashboard import dashboard_context

register = template.Library()


@register.inclusion_tag("admin/dashboard.html", takes_context=True)
def tokentill_dashboard(context):
    return dashboard_context(context["request"])
