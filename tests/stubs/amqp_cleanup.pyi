from tests.amqp_cleanup import *  # noqa: F403
