"""Everything that talks to RabbitMQ: the only package that imports pika (AMQP) or calls the management API."""
