# The publish/subscribe half of the same notes (../shared/seed/): connect and declare `logs` verbatim,
# then publish to it as the tutorial's emit_log.py does (the notes stop at the declaration); only
# `import pika` is added. Run through run.py, which maps "localhost" to RABBITMQ_URL.
import pika

connection = pika.BlockingConnection(pika.ConnectionParameters("localhost"))
channel = connection.channel()
channel.exchange_declare(exchange="logs", exchange_type="fanout")
channel.basic_publish(exchange="logs", routing_key="", body="info: Hello World!")
connection.close()
