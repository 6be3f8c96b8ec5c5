#!/usr/bin/env python3
"""paho-mqtt 2.x against a certmq broker, MQTT 3.1.1 then MQTT 5, over mutual TLS.

Run by tests/interop.rs (`paho_mqtt_round_trips`), or by hand:

    paho_check.py HOST PORT CAFILE CERTFILE KEYFILE DEVICE

For each protocol version: connect with the client certificate, publish a retained message
to the device's own topic, subscribe QoS 2 to devices/DEVICE/#, receive the retained message
(retain flag set), publish QoS 0, 1 and 2 and receive each at its own QoS, clear the
retained message, disconnect cleanly. Nothing else may arrive. Exit 0 on success; on failure
exit non-zero with one line on stderr saying what went wrong. A global alarm bounds the run.
"""

import os
import queue
import signal
import sys
import threading

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
except ImportError as e:  # the Rust test probes first; this is for runs by hand
    sys.exit(f"paho_check: paho-mqtt is not installed: {e}")

GLOBAL_TIMEOUT = 20  # seconds for the whole script
STEP_TIMEOUT = 5  # seconds for any one broker answer


class CheckFailed(Exception):
    """A broker answer was missing or wrong; the message says which."""


def on_alarm(signum, frame):
    print(f"paho_check: FAILED: no result within {GLOBAL_TIMEOUT} s", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


class Session:
    """One connected paho client and queues its callbacks feed, so that every wait is a
    bounded `get` instead of a sleep."""

    def __init__(self, protocol, host, port, ca, cert, key):
        self.label = "MQTTv5" if protocol == mqtt.MQTTv5 else "MQTTv311"
        self.events = queue.Queue()
        self.messages = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"paho-check-{self.label}-{os.getpid()}",
            protocol=protocol,
        )
        self.client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("subscribe", rcs))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc))
        self.client.on_message = lambda c, u, msg: self.messages.put(
            (msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        )
        self.host, self.port = host, port

    def expect_event(self, kind):
        try:
            got, value = self.events.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise CheckFailed(f"{self.label}: no {kind} answer within {STEP_TIMEOUT} s")
        if got != kind:
            raise CheckFailed(f"{self.label}: expected {kind}, got {got} {value}")
        return value

    def connect(self):
        if self.label == "MQTTv5":
            self.client.connect(self.host, self.port, keepalive=30, clean_start=True)
        else:
            self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        rc = self.expect_event("connect")
        if rc.is_failure:
            raise CheckFailed(f"{self.label}: CONNACK refused: {rc}")

    def publish(self, topic, payload, qos, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.label}: publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # QoS 1/2: returns once PUBACK / PUBCOMP arrived; QoS 0: once written.
        info.wait_for_publish(timeout=STEP_TIMEOUT)
        if not info.is_published():
            raise CheckFailed(f"{self.label}: QoS {qos} publish to {topic} not acknowledged")

    def subscribe(self, topic_filter, qos):
        self.client.subscribe(topic_filter, qos=qos)
        codes = self.expect_event("subscribe")
        granted = [c.value for c in codes]
        if granted != [qos]:
            raise CheckFailed(f"{self.label}: SUBACK for {topic_filter} granted {granted}, wanted [{qos}]")

    def receive(self, count):
        got = []
        for _ in range(count):
            try:
                got.append(self.messages.get(timeout=STEP_TIMEOUT))
            except queue.Empty:
                raise CheckFailed(f"{self.label}: received {got}, then nothing within {STEP_TIMEOUT} s")
        return got

    def disconnect(self):
        self.client.disconnect()
        rc = self.expect_event("disconnect")
        self.client.loop_stop()
        if rc.is_failure:
            raise CheckFailed(f"{self.label}: unclean disconnect: {rc}")


def check(protocol, host, port, ca, cert, key, device):
    s = Session(protocol, host, port, ca, cert, key)
    base = f"devices/{device}/paho/{s.label}"
    retained = (f"{base}/retained", b"kept", 1, True)
    s.connect()
    s.publish(retained[0], retained[1], qos=1, retain=True)
    s.subscribe(f"devices/{device}/#", qos=2)
    got = s.receive(1)
    if got != [retained]:
        raise CheckFailed(f"{s.label}: expected the retained message {retained}, got {got}")
    sent = [(f"{base}/qos{q}", f"payload at QoS {q}".encode(), q, False) for q in (0, 1, 2)]
    for topic, payload, qos, _ in sent:
        s.publish(topic, payload, qos=qos)
    got = s.receive(len(sent))
    if sorted(got) != sorted(sent):
        raise CheckFailed(f"{s.label}: expected {sent}, got {got}")
    # Clearing is delivered live (retain flag 0, empty payload); a marker after it shows
    # that nothing else was queued for us.
    s.publish(retained[0], b"", qos=1, retain=True)
    marker = (f"{base}/done", b"done", 1, False)
    s.publish(marker[0], marker[1], qos=1)
    got = s.receive(2)
    expected = [(retained[0], b"", 1, False), marker]
    if got != expected:
        raise CheckFailed(f"{s.label}: expected {expected}, got {got}")
    s.disconnect()
    print(f"paho_check: {s.label}: ok")


def main(argv):
    if len(argv) != 7:
        sys.exit(f"usage: {argv[0]} HOST PORT CAFILE CERTFILE KEYFILE DEVICE")
    if not paho.mqtt.__version__.startswith("2."):
        sys.exit(f"paho_check: paho-mqtt 2.x required, found {paho.mqtt.__version__}")
    host, port, ca, cert, key, device = argv[1], int(argv[2]), argv[3], argv[4], argv[5], argv[6]
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(GLOBAL_TIMEOUT)
    try:
        for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
            check(protocol, host, port, ca, cert, key, device)
    except CheckFailed as e:
        print(f"paho_check: FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # TLS and socket errors from paho: report them, never hang
        print(f"paho_check: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    # paho's network threads are daemons, but a failed run may leave one blocked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
