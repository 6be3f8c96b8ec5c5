//! certmq: an MQTT-over-TLS broker with mutual X.509 device authentication.
