# The RabbitMQ tutorial code our users start from, copied verbatim from the notes in ../shared/seed/
# ("Sending": connect, declare and check queue, publish, close), in their order; only `import pika` is added.
# Run through run.py, which maps "localhost" to RABBITMQ_URL; do not edit the tutorial lines below.
import pika

connection = pika.BlockingConnection(pika.ConnectionParameters("localhost"))
channel = connection.channel()
channel.queue_declare(queue="hello")
channel.exchange_declare(exchange="logs", exchange_type="fanout")
channel.basic_publish(
	exchange="", # default/direct
	routing_key="hello", # specific direct queue
	body="Hello World!",
)
connection.close()
