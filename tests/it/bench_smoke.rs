//! Smoke test of the load generator (`benches/load`, contract §11): every workload at a tiny
//! size against a real certmq broker in this process, plus the generator's codec,
//! percentile and /proc readers. Counts are asserted (every connection accepted, every
//! acknowledged QoS 1 message delivered), never timings: the machine is shared.

#[path = "../../benches/load/mod.rs"]
mod load;

use std::path::PathBuf;

use crate::common::{Broker, Fixture};
use certmq::pki::LeafSpec;
use clap::Parser;
use load::report::Report;
use load::LoadError;

/// A broker with the fleet anchor (devices provisioned on first connection, `device`
/// ACL) and a pinned `backend` allowed to read every topic: the bench subscriber.
struct Bench {
    fx: Fixture,
    broker: Broker,
}

impl Bench {
    async fn start() -> Bench {
        let fx = Fixture::new();
        fx.write("fleet.key", &fx.fleet.key_pem());
        let backend = fx
            .root
            .issue(&LeafSpec::device("backend.example.com"))
            .unwrap();
        fx.write("backend.pem", &backend.cert_pem);
        fx.write("backend.key", &backend.key_pem);
        let config = fx.config(&format!(
            "{}acl = \"device\"\n\n[[device]]\nname = \"backend\"\ncertificate = \"backend.pem\"\nacl = \"backend\"\n\n[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n",
            Fixture::fleet_anchor(true)
        ));
        let broker = Broker::start(&config).await;
        Bench { fx, broker }
    }

    fn path(&self, name: &str) -> String {
        self.fx.path(name).display().to_string()
    }

    /// Runs the generator with the common options plus `extra`.
    async fn run(
        &self,
        workload: &str,
        extra: &[&str],
        with_sub: bool,
    ) -> Result<Report, LoadError> {
        let mut args: Vec<String> = [
            "load",
            workload,
            "--host",
            "127.0.0.1",
            "--server-name",
            "localhost",
            "--timeout",
            "10",
            "--label",
            "certmq",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--port".into(), self.broker.addr.port().to_string()]);
        args.extend(["--ca".into(), self.path("root.pem")]);
        args.extend(["--issuer-cert".into(), self.path("fleet.pem")]);
        args.extend(["--issuer-key".into(), self.path("fleet.key")]);
        args.extend(["--pid".into(), std::process::id().to_string()]);
        if with_sub {
            args.extend(["--sub-cert".into(), self.path("backend.pem")]);
            args.extend(["--sub-key".into(), self.path("backend.key")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args = load::cli::Args::try_parse_from(args).unwrap();
        load::run(&args).await
    }
}

fn figure(report: &Report, name: &str) -> f64 {
    report
        .figures
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.value)
        .unwrap_or_else(|| panic!("no figure {name} in {report:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_one_distinct_device_per_connection() {
    let bench = Bench::start().await;
    let devices: PathBuf = bench.fx.path("devices");
    let dir = devices.display().to_string();
    let r = bench
        .run(
            "connect",
            &["-n", "6", "-c", "3", "--devices-dir", &dir],
            false,
        )
        .await
        .unwrap();
    assert_eq!(figure(&r, "connected"), 6.0, "{r:?}");
    assert_eq!(figure(&r, "failed"), 0.0);
    assert!(figure(&r, "connects_per_s") > 0.0);
    assert!(figure(&r, "connect_p99_ms") >= figure(&r, "connect_p50_ms"));
    assert!(figure(&r, "server_cpu_ms_per_connect") >= 0.0);
    // Six devices were provisioned, each under its own name.
    let names: Vec<String> = crate::common::registry(&bench.fx)
        .list()
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with("bench-"))
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    // A second run presents the same, kept certificates: known devices reconnecting.
    let kept = std::fs::read_dir(&devices).unwrap().count();
    assert_eq!(kept, 12);
    let again = bench
        .run(
            "connect",
            &["-n", "6", "-c", "2", "--devices-dir", &dir],
            false,
        )
        .await
        .unwrap();
    assert_eq!(figure(&again, "connected"), 6.0);
    assert_eq!(std::fs::read_dir(&devices).unwrap().count(), 12);
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_delivers_every_acknowledged_qos1_message() {
    let bench = Bench::start().await;
    let r = bench
        .run(
            "fan-in",
            &[
                "--publishers",
                "2",
                "--qos",
                "1",
                "--duration",
                "0.3",
                "--window",
                "4",
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(r.workload, "fan-in-qos1");
    let sent = figure(&r, "sent");
    assert!(sent > 0.0, "{r:?}");
    assert_eq!(figure(&r, "delivered"), sent, "{r:?}");
    assert_eq!(figure(&r, "lost"), 0.0);
    assert_eq!(figure(&r, "acked"), sent, "{r:?}");
    assert_eq!(figure(&r, "rejected"), 0.0);
    assert_eq!(figure(&r, "acked_lost"), 0.0);
    assert_eq!(figure(&r, "duplicates"), 0.0);
    assert!(figure(&r, "latency_p50_ms") > 0.0);
    let q0 = bench
        .run(
            "fan-in",
            &["--publishers", "2", "--duration", "0.2", "--rate", "200"],
            true,
        )
        .await
        .unwrap();
    assert!(figure(&q0, "delivered") > 0.0, "{q0:?}");
    bench.broker.stop().await;
}

/// `--sub-host`/`--sub-port` send the subscribers to another broker than the publishers
/// (another cluster node in `compare-cluster.sh`): with nothing listening there the run
/// fails at the subscriber's connect; pointed back at the same broker it delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_subscribers_connect_where_sub_port_says() {
    let bench = Bench::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let err = bench
        .run(
            "fan-in",
            &[
                "--publishers",
                "1",
                "--duration",
                "0.1",
                "--sub-port",
                &closed,
            ],
            true,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Io {
                what: "TCP connect",
                ..
            }
        ),
        "{err:?}"
    );
    let same = bench.broker.addr.port().to_string();
    let r = bench
        .run(
            "fan-in",
            &[
                "--publishers",
                "1",
                "--qos",
                "1",
                "--duration",
                "0.2",
                "--sub-host",
                "127.0.0.1",
                "--sub-port",
                &same,
            ],
            true,
        )
        .await
        .unwrap();
    assert!(figure(&r, "delivered") > 0.0, "{r:?}");
    assert_eq!(figure(&r, "acked_lost"), 0.0, "{r:?}");
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_delivers_each_message_to_every_subscriber() {
    let bench = Bench::start().await;
    let r = bench
        .run(
            "fan-out",
            &[
                "--subscribers",
                "3",
                "--qos",
                "1",
                "--duration",
                "0.3",
                "--json",
            ],
            true,
        )
        .await
        .unwrap();
    let sent = figure(&r, "sent");
    assert!(sent > 0.0, "{r:?}");
    assert_eq!(figure(&r, "delivered"), 3.0 * sent, "{r:?}");
    let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
    assert_eq!(json["workload"], "fan-out-qos1");
    assert_eq!(json["broker"], "certmq");
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections_and_reads_the_broker_rss() {
    let bench = Bench::start().await;
    let r = bench
        .run("idle", &["-n", "8", "-c", "4", "--settle", "0.1"], false)
        .await
        .unwrap();
    assert_eq!(figure(&r, "held"), 8.0, "{r:?}");
    assert_eq!(figure(&r, "held_at_end"), 8.0);
    assert!(figure(&r, "rss_after_mib") > 0.0);
    assert!(figure(&r, "rss_kib_per_connection") >= 0.0);
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_keeps_every_message_for_the_offline_session_and_reads_the_rss() {
    let bench = Bench::start().await;
    let r = bench
        .run("queued", &["-n", "45", "--settle", "0.1"], true)
        .await
        .unwrap();
    assert_eq!(figure(&r, "messages"), 45.0, "{r:?}");
    assert_eq!(figure(&r, "rejected"), 0.0, "{r:?}");
    assert_eq!(figure(&r, "queued"), 45.0, "{r:?}");
    assert!(figure(&r, "rss_bytes_per_message") >= 0.0);
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_keeps_one_message_per_topic_and_reads_the_rss() {
    let bench = Bench::start().await;
    let r = bench
        .run("retained", &["-n", "45", "--settle", "0.1"], true)
        .await
        .unwrap();
    assert_eq!(figure(&r, "rejected"), 0.0, "{r:?}");
    assert_eq!(figure(&r, "retained"), 45.0, "{r:?}");
    assert!(figure(&r, "rss_after_mib") > 0.0);
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connects_from_the_source_addresses_given() {
    let bench = Bench::start().await;
    let r = bench
        .run(
            "idle",
            &[
                "-n",
                "6",
                "-c",
                "2",
                "--settle",
                "0.1",
                "--source-addrs",
                "127.0.0.1,127.0.0.2",
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(figure(&r, "held"), 6.0, "{r:?}");
    assert!(figure(&r, "kernel_slab_kib_per_connection").is_finite());
    bench.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_the_acl_refuses_fails_the_run() {
    let bench = Bench::start().await;
    // Without --sub-cert the subscriber is device bench-0, whose `device` profile may not
    // read devices/+/bench: the run must say so rather than report zero deliveries.
    let err = bench
        .run("fan-in", &["--publishers", "1", "--duration", "0.1"], false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadError::SubscribeRefused { code: 0x80, .. }),
        "{err:?}"
    );
    bench.broker.stop().await;
}

#[test]
fn cli_accepts_what_cargo_bench_appends_and_needs_an_identity() {
    let ok = load::cli::Args::try_parse_from([
        "load", "connect", "--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem", "--bench",
    ]);
    assert!(ok.is_ok(), "{ok:?}");
    let none = load::cli::Args::try_parse_from(["load", "connect", "--ca", "ca.pem"]);
    assert!(none.is_err());
    let both = load::cli::Args::try_parse_from([
        "load",
        "idle",
        "--ca",
        "a",
        "--cert",
        "c",
        "--key",
        "k",
        "--issuer-cert",
        "i",
        "--issuer-key",
        "j",
    ]);
    assert!(both.is_err());
    let bad_qos = load::cli::Args::try_parse_from([
        "load", "fan-in", "--ca", "a", "--cert", "c", "--key", "k", "--qos", "2",
    ]);
    assert!(bad_qos.is_err());
}

mod codec {
    use crate::bench_smoke::load::mqtt::*;
    use bytes::Bytes;

    fn decode_all(bytes: &[u8]) -> Vec<Packet> {
        let mut d = Decoder::new();
        d.buffer().extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(p) = d.next().unwrap() {
            out.push(p);
        }
        out
    }

    #[test]
    fn connect_matches_the_spec_bytes() {
        let mut b = Vec::new();
        connect(&mut b, "ab", 60, true);
        assert_eq!(
            b,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn publish_round_trips_with_a_long_remaining_length() {
        let payload = vec![7u8; 300];
        let mut b = Vec::new();
        publish(&mut b, "a/b", 1, 513, false, &payload);
        assert_eq!(&b[..3], &[0x32, 0xb3, 0x02]);
        let mut retained = Vec::new();
        publish(&mut retained, "a/b", 0, 0, true, b"x");
        assert_eq!(retained[0], 0x31, "RETAIN is bit 0");
        let got = decode_all(&b);
        assert_eq!(
            got,
            [Packet::Publish {
                qos: 1,
                packet_id: 513,
                payload: Bytes::from(payload)
            }]
        );
    }

    #[test]
    fn decoder_waits_for_a_whole_packet() {
        let mut d = Decoder::new();
        d.buffer().extend_from_slice(&[0x90, 3, 0]);
        assert_eq!(d.next().unwrap(), None);
        d.buffer().extend_from_slice(&[5, 0x80, 0x20, 2]);
        assert_eq!(
            d.next().unwrap(),
            Some(Packet::SubAck {
                packet_id: 5,
                codes: vec![0x80]
            })
        );
        assert_eq!(d.next().unwrap(), None);
        d.buffer().extend_from_slice(&[0, 5]);
        assert_eq!(d.next().unwrap(), Some(Packet::ConnAck { code: 5 }));
    }

    #[test]
    fn puback_reads_an_mqtt5_reason_code_and_none_as_success() {
        assert_eq!(
            decode_all(&[0x40, 2, 0, 7, 0x40, 4, 0, 8, 0x97, 0]),
            [
                Packet::PubAck {
                    packet_id: 7,
                    reason: 0
                },
                Packet::PubAck {
                    packet_id: 8,
                    reason: 0x97
                }
            ]
        );
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut d = Decoder::new();
        d.buffer()
            .extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(d.next(), Err(MqttError::RemainingLength)));
        let mut d = Decoder::new();
        d.buffer().extend_from_slice(&[0x32, 3, 0, 9, b'a']);
        assert!(matches!(d.next(), Err(MqttError::Truncated { .. })));
        let mut d = Decoder::new();
        d.buffer().extend_from_slice(&[0x36, 2, 0, 0]);
        assert!(matches!(d.next(), Err(MqttError::InvalidQos { .. })));
    }
}

mod delivery_accounting {
    use crate::bench_smoke::load::flow::{read_header, Seen};

    #[test]
    fn seen_counts_duplicates_and_what_another_set_misses() {
        let mut acked = Seen::default();
        let mut received = Seen::default();
        for seq in [0, 1, 63, 64, 200] {
            assert!(acked.insert(seq));
        }
        for seq in [1, 64, 500] {
            assert!(received.insert(seq));
        }
        assert!(!received.insert(64), "a duplicate");
        assert_eq!(acked.count(), 5);
        assert_eq!(received.count(), 3);
        assert_eq!(acked.missing_from(&received), 3); // 0, 63 and 200
        assert_eq!(received.missing_from(&acked), 1); // 500, never acknowledged
    }

    #[test]
    fn a_payload_shorter_than_the_header_is_not_ours() {
        assert_eq!(read_header(&[0; 19]), None);
        let mut p = vec![0u8; 64];
        p[..8].copy_from_slice(&5u64.to_le_bytes());
        p[8..12].copy_from_slice(&3u32.to_le_bytes());
        p[12..20].copy_from_slice(&9u64.to_le_bytes());
        assert_eq!(read_header(&p), Some((5, 3, 9)));
    }
}

mod procfs_readers {
    use crate::bench_smoke::load::procfs::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap().0 >= 0.0);
        assert!(open_files_limit().unwrap() > 0);
        assert!(rss_kib(u32::MAX).is_err());
        assert!(kernel_mem().unwrap().slab_kib > 0);
    }
}

mod report_format {
    use crate::bench_smoke::load::report::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::new();
        for ms in (1..=100).rev() {
            l.push(ms * 1_000_000);
        }
        assert_eq!(l.percentile_ms(50.0), 50.0);
        assert_eq!(l.percentile_ms(99.0), 99.0);
        assert_eq!(l.percentile_ms(100.0), 100.0);
        assert_eq!(l.percentile_ms(0.0), 1.0);
        assert!(Latencies::new().percentile_ms(50.0).is_nan());
    }

    #[test]
    fn json_keeps_every_figure_and_nulls_nan() {
        let mut r = Report::new("connect", "certmq");
        r.push("connects_per_s", 1234.5);
        r.push("p50_ms", f64::NAN);
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["workload"], "connect");
        assert_eq!(v["broker"], "certmq");
        assert_eq!(v["figures"]["connects_per_s"], 1234.5);
        assert!(v["figures"]["p50_ms"].is_null());
        assert!(r.table().contains("connects_per_s  1234.5"));
    }
}
