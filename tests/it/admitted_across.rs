//! Contract §4 "A session lives only as long as its identity", §8: a connection admitted
//! across a registry change is held to it like any other. CONNECT decides on the registry
//! row it read; when a disable, delete or rotation lands and its re-check copies the live
//! list before that connection registers, the connection must still be re-checked (it
//! decides once more after registering). Both tests are stress loops: attackers reconnect
//! back to back while the change lands, and every connection they keep must be cut well
//! within the contract's 2 seconds.

use std::time::Duration;

use crate::common::coretests::raw::{Pkt, Raw, RawConnect};
use crate::common::coretests::V;
use crate::common::ops::{config, Proc};
use crate::common::{Fixture, WAIT};

/// A connection whose CONNECT was decided just before a rotation committed, and that
/// registers with `Live` just after the rotation's re-check copied the list, decides once
/// more after registering (the registry generation changed) and is cut: it must not keep
/// the superseded certificate's session. Stress: attackers holding the old key reconnect
/// in a loop while the legitimate device rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_admitted_across_a_rotation_loses_the_superseded_certificate() {
    use certmq::pki::{LeafSpec, Validity};
    use std::sync::Arc;
    const ROUNDS: usize = 12;
    const ATTACKERS: usize = 6;
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let broker = Proc::start(&fx, &path).await;
    let now = time::OffsetDateTime::now_utc();
    let now = now - time::Duration::nanoseconds(i64::from(now.nanosecond()));
    let certs: Vec<Arc<crate::common::Client>> = (0..=ROUNDS)
        .map(|k| {
            let spec = LeafSpec {
                validity: Validity {
                    not_before: now - time::Duration::days(1)
                        + time::Duration::seconds(k as i64 * 10),
                    not_after: now + time::Duration::days(10),
                },
                ..LeafSpec::device("d1.devices.example.com")
            };
            Arc::new(fx.client(&fx.fleet.issue(&spec).expect("leaf")))
        })
        .collect();
    // Provisioned with certs[0].
    let (first, _) = Raw::try_connect(
        &certs[0],
        broker.mqtt,
        &RawConnect::new(V::V4, "seed").bytes(),
    )
    .await
    .expect("connect");
    drop(first);
    let mut survivors = Vec::new();
    for round in 0..ROUNDS {
        let (old, new) = (certs[round].clone(), certs[round + 1].clone());
        let mut tasks = Vec::new();
        for t in 0..ATTACKERS {
            let old = old.clone();
            let addr = broker.mqtt;
            tasks.push(tokio::spawn(async move {
                let mut last = None;
                for n in 0.. {
                    let id = format!("a{round}-{t}-{n}");
                    match Raw::try_connect(&old, addr, &RawConnect::new(V::V4, &id).bytes()).await {
                        Ok((raw, Pkt::ConnAck { code: 0, .. })) => last = Some(raw),
                        Ok(_) => break, // refused: superseded
                        Err(_) => {}
                    }
                }
                last
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (legit, ack) = Raw::try_connect(
            &new,
            broker.mqtt,
            &RawConnect::new(V::V4, &format!("legit{round}")).bytes(),
        )
        .await
        .expect("rotation connect");
        assert!(
            matches!(ack, Pkt::ConnAck { code: 0, .. }),
            "rotation admitted: {ack:?}"
        );
        for t in tasks {
            if let Some(raw) = t.await.expect("attacker") {
                survivors.push((round, raw));
            }
        }
        drop(legit);
    }
    // Well past any re-check (registry poll 500 ms): whoever still answers a PINGREQ kept
    // a session with a certificate the registry no longer holds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut alive = Vec::new();
    for (round, mut raw) in survivors {
        if raw.try_send(&[0xC0, 0]).await.is_ok() {
            if let Ok(Pkt::Other(p)) = tokio::time::timeout(Duration::from_secs(2), raw.try_recv())
                .await
                .unwrap_or(Err("timeout".into()))
            {
                if p == [0xD0, 0] {
                    alive.push(round);
                }
            }
        }
    }
    assert!(
        alive.is_empty(),
        "connections with a superseded certificate still served after rotation (rounds {alive:?})"
    );
}

/// Cluster mode: the same race with `certmq devices disable`. A CONNECT decided on the
/// node's mirror just before the KV watch delivers the change, whose connection registers
/// with `Live` (after the cluster claim's NATS round trip) just after the pushed re-check
/// copied the list, must still be cut within the contract's 2 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_connection_admitted_across_a_disable_is_cut() {
    use std::sync::Arc;
    let Some(nats) = crate::common::nats::Nats::start() else {
        return;
    };
    const ROUNDS: usize = 6;
    const ATTACKERS: usize = 6;
    let fx = Fixture::new();
    let body = Fixture::fleet_anchor(true);
    let a = crate::common::cluster::start_node(&fx, &nats, "a", &body).await;
    let cli_config = fx.path("certmq-a.toml");
    let dev = Arc::new(fx.client(&fx.device("d1.devices.example.com")));
    let mut alive = Vec::new();
    let mut held = 0;
    for round in 0..ROUNDS {
        // Enabled (provisioned at the first round).
        let ready = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok((_, Pkt::ConnAck { code: 0, .. })) =
                    Raw::try_connect(&dev, a.mqtt, &RawConnect::new(V::V4, "probe").bytes()).await
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "d1 admitted again");
        let mut tasks = Vec::new();
        for t in 0..ATTACKERS {
            let dev = dev.clone();
            let addr = a.mqtt;
            tasks.push(tokio::spawn(async move {
                let mut last = None;
                for n in 0.. {
                    let id = format!("a{round}-{t}-{n}");
                    match Raw::try_connect(&dev, addr, &RawConnect::new(V::V4, &id).bytes()).await {
                        Ok((raw, Pkt::ConnAck { code: 0, .. })) => last = Some(raw),
                        Ok(_) => break, // refused: disabled
                        Err(_) => {}
                    }
                }
                last
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (dir, path) = (fx.dir.path().to_path_buf(), cli_config.clone());
        let run = tokio::task::spawn_blocking(move || {
            crate::common::run::certmq(
                &dir,
                &[
                    "devices",
                    "disable",
                    "d1",
                    "--config",
                    crate::common::run::arg(&path),
                ],
            )
        })
        .await
        .expect("cli");
        assert_eq!(run.code, Some(0), "{run:?}");
        let mut last = Vec::new();
        for t in tasks {
            if let Some(raw) = t.await.expect("attacker") {
                last.push(raw);
            }
        }
        held += last.len();
        // Well past the 2 s the specification allows for a disable to cut sessions.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        for mut raw in last {
            if raw.try_send(&[0xC0, 0]).await.is_ok() {
                if let Ok(Ok(Pkt::Other(p))) =
                    tokio::time::timeout(Duration::from_secs(2), raw.try_recv()).await
                {
                    if p == [0xD0, 0] {
                        alive.push((round, raw));
                    }
                }
            }
        }
        if !alive.is_empty() {
            break;
        }
        let (dir, path) = (fx.dir.path().to_path_buf(), cli_config.clone());
        let run = tokio::task::spawn_blocking(move || {
            crate::common::run::certmq(
                &dir,
                &[
                    "devices",
                    "enable",
                    "d1",
                    "--config",
                    crate::common::run::arg(&path),
                ],
            )
        })
        .await
        .expect("cli");
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    eprintln!("held connections checked: {held}");
    for line in a
        .stderr()
        .lines()
        .filter(|l| {
            l.contains("revoked")
                || l.contains("registry changed")
                || l.contains("disabled")
                || (l.contains("accepted at CONNECT") && l.contains("a0-"))
        })
        .collect::<Vec<_>>()
        .iter()
        .rev()
        .take(30)
        .rev()
    {
        eprintln!("LOG {line}");
    }
    assert!(
        alive.is_empty(),
        "a disabled device's connection still served 3 s after `devices disable` (round {:?})",
        alive.iter().map(|(r, _)| *r).collect::<Vec<_>>()
    );
}
