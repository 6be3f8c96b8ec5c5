#!/usr/bin/env python3
"""paho-mqtt 2.x against certmq's server-assigned topic aliases (MQTT 5 3.3.2.3.4).

Run by tests/it/conformance.rs (`mqtt_3_3_2_3_4_paho_decodes_server_aliases_v5`), or by hand:

    paho_topic_alias.py HOST PORT CAFILE CERTFILE KEYFILE DEVICE

Two MQTT 5 clients with the device's certificate: one states Topic Alias Maximum 2 and
subscribes to devices/DEVICE/alias/#, the other states none, subscribes to the same, and
publishes a sequence of QoS 1 messages over three topics. paho-mqtt 2.x decodes the topic
alias property but does not resolve it (an alias alone arrives as an empty topic), so this
script keeps the mapping the way MQTT 5 3.3.2.3.4 defines it and checks that:

- the aliasing subscriber gets every message, each one resolving to the topic it was
  published on, no alias above 2, no empty topic without an alias set before;
- at least one message arrives by alias alone (certmq did assign aliases);
- the subscriber that stated no maximum never sees an alias or an empty topic.

Exit 0 and print "paho_topic_alias: ok" on success; on failure exit non-zero with one line
on stderr. A global alarm bounds the run.
"""

import os
import queue
import signal
import sys

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as e:  # the Rust test probes first; this is for runs by hand
    sys.exit(f"paho_topic_alias: paho-mqtt is not installed: {e}")

GLOBAL_TIMEOUT = 20  # seconds for the whole script
STEP_TIMEOUT = 5  # seconds for any one broker answer


class CheckFailed(Exception):
    """A broker answer was missing or wrong; the message says which."""


def on_alarm(signum, frame):
    print(f"paho_topic_alias: FAILED: no result within {GLOBAL_TIMEOUT} s", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


class Client:
    """One connected paho MQTT 5 client whose callbacks feed queues (bounded waits)."""

    def __init__(self, name, alias_maximum, host, port, ca, cert, key):
        self.name = name
        self.events = queue.Queue()
        self.messages = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"paho-alias-{name}-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("subscribe", rcs))
        self.client.on_message = lambda c, u, msg: self.messages.put(
            (msg.topic, getattr(msg.properties, "TopicAlias", None), bytes(msg.payload))
        )
        properties = None
        if alias_maximum is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.TopicAliasMaximum = alias_maximum
        self.client.connect(host, port, keepalive=30, clean_start=True, properties=properties)
        self.client.loop_start()
        rc = self.expect("connect")
        if rc.is_failure:
            raise CheckFailed(f"{name}: CONNACK refused: {rc}")

    def expect(self, kind):
        try:
            got, value = self.events.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise CheckFailed(f"{self.name}: no {kind} answer within {STEP_TIMEOUT} s")
        if got != kind:
            raise CheckFailed(f"{self.name}: expected {kind}, got {got} {value}")
        return value

    def subscribe(self, topic_filter):
        self.client.subscribe(topic_filter, qos=1)
        codes = [c.value for c in self.expect("subscribe")]
        if codes != [1]:
            raise CheckFailed(f"{self.name}: SUBACK for {topic_filter} granted {codes}")

    def publish(self, topic, payload):
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=STEP_TIMEOUT)
        if not info.is_published():
            raise CheckFailed(f"{self.name}: publish to {topic} not acknowledged")

    def receive(self, count):
        got = []
        for _ in range(count):
            try:
                got.append(self.messages.get(timeout=STEP_TIMEOUT))
            except queue.Empty:
                raise CheckFailed(f"{self.name}: received {got}, then nothing within {STEP_TIMEOUT} s")
        return got

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def resolve(received, maximum):
    """The topics of `received` (topic, alias, payload) as MQTT 5 3.3.2.3.4 maps them."""
    mapping = {}
    resolved = []
    for topic, alias, payload in received:
        if alias is not None:
            if not 1 <= alias <= maximum:
                raise CheckFailed(f"alias {alias} outside 1..{maximum}")
            if topic:
                mapping[alias] = topic
            elif alias not in mapping:
                raise CheckFailed(f"alias {alias} used before it was set: {received}")
            topic = mapping[alias]
        elif not topic:
            raise CheckFailed(f"an empty topic without an alias: {received}")
        resolved.append((topic, payload))
    return resolved


def check(host, port, ca, cert, key, device):
    base = f"devices/{device}/alias"
    aliasing = Client("aliasing", 2, host, port, ca, cert, key)
    plain = Client("plain", None, host, port, ca, cert, key)
    for c in (aliasing, plain):
        c.subscribe(f"{base}/#")
    # Three topics over two aliases: a, a, b, a, c, c, c, a, b, c.
    names = "aabaccc" + "abc"
    sent = [(f"{base}/{n}", f"{i}".encode()) for i, n in enumerate(names)]
    for topic, payload in sent:
        plain.publish(topic, payload)
    got = aliasing.receive(len(sent))
    if resolve(got, 2) != sent:
        raise CheckFailed(f"aliasing: resolved {resolve(got, 2)}, published {sent}: raw {got}")
    if not any(alias is not None and not topic for topic, alias, _ in got):
        raise CheckFailed(f"aliasing: no message arrived by alias alone: {got}")
    got = plain.receive(len(sent))
    if [(t, p) for t, _, p in got] != sent or any(a is not None for _, a, _ in got):
        raise CheckFailed(f"plain: expected {sent} without aliases, got {got}")
    for c in (aliasing, plain):
        c.close()
    print("paho_topic_alias: ok")


def main(argv):
    if len(argv) != 7:
        sys.exit(f"usage: {argv[0]} HOST PORT CAFILE CERTFILE KEYFILE DEVICE")
    if not paho.mqtt.__version__.startswith("2."):
        sys.exit(f"paho_topic_alias: paho-mqtt 2.x required, found {paho.mqtt.__version__}")
    host, port, ca, cert, key, device = argv[1], int(argv[2]), argv[3], argv[4], argv[5], argv[6]
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(GLOBAL_TIMEOUT)
    try:
        check(host, port, ca, cert, key, device)
    except CheckFailed as e:
        print(f"paho_topic_alias: FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # TLS and socket errors from paho: report them, never hang
        print(f"paho_topic_alias: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
