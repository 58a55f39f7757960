from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.contrib.auth.signals import user_logged_out

        # Every sign-out of a session — the portal's /logout, the admin's, any later view — goes
        # through django.contrib.auth.logout, and this signal is the one place that hears them all.
        user_logged_out.connect(_close_session_sockets, dispatch_uid="accounts.close_session_sockets")


def _close_session_sockets(sender, request, user, **kwargs):
    """The session ends: its ``/ws/events`` sockets close (sent before the session is flushed)."""
    from wallet import events

    session_key = request.session.session_key
    if user is not None and session_key:
        events.publish_revocation_on_commit(user.pk, events.session_credential(session_key))
