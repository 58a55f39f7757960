"""DRF entry points: the pack list and checkout creation."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from wallet.serializers import MoneyField

from .models import Provider
from .selectors import pack_list
from .services import (
    NotAllowedToBuy,
    ProviderError,
    ProviderNotConfigured,
    UnknownOrganization,
    UnknownPack,
    checkout_create,
)
from .throttles import CheckoutThrottle


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "This payment provider is not configured."


class BadGateway(exceptions.APIException):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The payment provider could not create a checkout."


class PackSerializer(serializers.Serializer):
    id = serializers.CharField(source="slug")
    name = serializers.CharField()
    price = MoneyField()
    currency = serializers.CharField()
    credit = MoneyField(help_text="what lands in the wallet, bonus included")
    bonus = MoneyField()
    recurring = serializers.BooleanField()
    lemonsqueezy_variant_id = serializers.CharField()
    stripe_price_id = serializers.CharField()


class PackListApi(APIView):
    # The price list is public: a desktop app may show it before anyone signs in.
    permission_classes = [AllowAny]

    @extend_schema(responses=PackSerializer(many=True))
    def get(self, request):
        return Response(PackSerializer(pack_list(), many=True).data)


class CheckoutCreateApi(APIView):
    throttle_classes = [CheckoutThrottle]

    class InputSerializer(serializers.Serializer):
        pack = serializers.CharField(max_length=40)
        provider = serializers.ChoiceField(choices=Provider.choices, required=False)
        organization = serializers.CharField(
            max_length=50, required=False, help_text="an organization's id or slug: top up its wallet (owners, admins)"
        )

    def throttled(self, request, wait):
        # DRF appends "Expected available in N seconds." and sets Retry-After.
        raise exceptions.Throttled(wait=wait, detail="Too many checkouts started.")

    @extend_schema(
        request=InputSerializer,
        responses={
            201: inline_serializer(
                "CheckoutCreated", {"checkout_id": serializers.CharField(), "url": serializers.URLField()}
            ),
            429: OpenApiResponse(description="too many checkouts started (CHECKOUT_RATE per user); see Retry-After"),
        },
        description="Starts a hosted checkout for a credit pack. Limited per user (CHECKOUT_RATE, default 10 per "
        "hour), together with the portal's top-up form.",
    )
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            checkout = checkout_create(
                user=request.user,
                pack_slug=data.validated_data["pack"],
                provider=data.validated_data.get("provider"),
                organization=data.validated_data.get("organization"),
            )
        except UnknownOrganization as exc:
            raise exceptions.NotFound(str(exc))
        except NotAllowedToBuy as exc:
            raise exceptions.PermissionDenied(str(exc))
        except UnknownPack as exc:
            raise exceptions.ValidationError({"detail": str(exc)})
        except ProviderNotConfigured as exc:
            raise ServiceUnavailable(str(exc))
        except ProviderError as exc:
            raise BadGateway(str(exc))
        return Response({"checkout_id": checkout.public_id, "url": checkout.url}, status=status.HTTP_201_CREATED)
