"""RabbitMQ broker for qtasks, on aio-pika."""
