"""The twistd plugin: ``twistd -n delivery --config delivery.yaml``."""

from twisted.application.service import ServiceMaker

delivery = ServiceMaker(
    "delivery",
    "delivery.daemon",
    "Reliable event delivery to Matrix application services",
    "delivery",
)
