"""RabbitMQ broker for qtasks, on aio-pika.

``RabbitMQBroker`` is registered as the ``rabbitmq`` entry point of ``qtasks.brokers``, so
``broker="rabbitmq"`` (or ``qtasks run --broker rabbitmq``) finds it.
"""

from qtasks_rabbitmq.broker import DEFAULT_URL, RabbitMQBroker, RabbitMQDelivery
from qtasks_rabbitmq.errors import OversizedMessageError, PublishRejectedError, TopologyError
from qtasks_rabbitmq.settings import RabbitMQSettings
from qtasks_rabbitmq.topology import Topology

__all__ = [
    "DEFAULT_URL",
    "OversizedMessageError",
    "PublishRejectedError",
    "RabbitMQBroker",
    "RabbitMQDelivery",
    "RabbitMQSettings",
    "Topology",
    "TopologyError",
]
