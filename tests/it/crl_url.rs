//! CRLs from their distribution point (docs/crl.md), against a broker process and a real
//! HTTP server started by the test that serves a changing CRL: a revocation published
//! there cuts the live session within one refresh without SIGHUP; an unreachable server,
//! a forged signature or a replayed older CRL change nothing (the last good CRL stays in
//! force, also across a restart) and show in the metrics and `/healthz`; without any CRL
//! the anchor refuses every certificate until the first good fetch.

use std::time::Duration;

use crate::common::crl_server::{Answer, CrlServer};
use crate::common::ops::{config, open_v5, pinned, Proc};
use crate::common::run::{arg, certmq};
use crate::common::{self_signed, Client, Fixture, Outcome};
use certmq::pki::{Ca, Validity};

/// A CRL of `ca` revoking `serials`, issued `age` ago, valid for a week more.
fn crl(ca: &Ca, serials: &[u64], age: Duration) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("ns");
    let validity = Validity {
        not_before: now - age,
        not_after: now + time::Duration::days(7),
    };
    ca.crl(serials, validity).expect("CRL").into_bytes()
}

const HOUR: Duration = Duration::from_secs(3600);

/// The fleet anchor taking its CRL from `url`, fetched every second.
fn fleet_from(url: &str) -> String {
    format!(
        "{}crl_url = \"{url}\"\ncrl_refresh = 1\n",
        Fixture::fleet_anchor(true)
    )
}

/// Polls `/metrics` until `series` is at least `min`.
async fn wait_metric_at_least(broker: &Proc, series: &str, min: f64) -> f64 {
    let mut last = None;
    let reached = tokio::time::timeout(crate::common::WAIT, async {
        loop {
            last = broker.metric(series).await;
            if last.is_some_and(|v| v >= min) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{series} stayed {last:?}, expected >= {min}"
    );
    last.unwrap_or_default()
}

const FAILURES: &str = "certmq_crl_fetch_failures_total{anchor=\"fleet\"}";
const LAST_SUCCESS: &str = "certmq_crl_last_fetch_success_timestamp_seconds{anchor=\"fleet\"}";

#[tokio::test]
async fn a_revocation_at_the_distribution_point_cuts_the_session_within_one_refresh() {
    let fx = Fixture::new();
    let d1 = fx.device("d1.devices.example.com");
    let d2 = fx.device("d2.devices.example.com");
    let server = CrlServer::start(Answer::Body(crl(&fx.fleet, &[], HOUR))).await;
    let mut broker = Proc::start(&fx, &config(&fx, &fleet_from(&server.url()))).await;
    wait_metric_at_least(&broker, LAST_SUCCESS, 1.0).await;
    let mut s1 = open_v5(&fx.client(&d1), broker.mqtt, "s1").await;
    let mut s2 = open_v5(&fx.client(&d2), broker.mqtt, "s2").await;
    // The CA publishes a new CRL revoking d1; nobody signals the broker.
    server.set(Answer::Body(crl(&fx.fleet, &[d1.serial], HOUR / 2)));
    let line = broker.wait_line("CRL updated from crl_url").await;
    assert!(line.contains("revoked=1"), "{line}");
    let cut = s1.expect_disconnect(Duration::from_secs(5)).await;
    assert_eq!(cut.code, 0x87, "{cut:?}");
    assert!(cut.reason.contains("revoked"), "{cut:?}");
    s2.ping().await;
    fx.client(&d1)
        .connect_v5(broker.mqtt, "again")
        .await
        .assert_tls_alert("CertificateRevoked");
    // The good copy is kept in data_dir for the next start.
    let stored = std::fs::read(fx.data_dir().join("crl/fleet.crl")).expect("stored CRL");
    assert!(!stored.is_empty());
    assert_eq!(broker.metric(FAILURES).await, Some(0.0));
}

#[tokio::test]
async fn an_unreachable_distribution_point_keeps_the_last_good_crl_across_a_restart() {
    let fx = Fixture::new();
    let revoked = fx.device("old.devices.example.com");
    let good = fx.device("d1.devices.example.com");
    let mut server = CrlServer::start(Answer::Body(crl(&fx.fleet, &[revoked.serial], HOUR))).await;
    let path = config(&fx, &fleet_from(&server.url()));
    let mut broker = Proc::start(&fx, &path).await;
    wait_metric_at_least(&broker, LAST_SUCCESS, 1.0).await;
    server.shut_down().await;
    wait_metric_at_least(&broker, FAILURES, 1.0).await;
    let (status, health) = broker.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    assert!(
        health.contains(&format!(
            "warning: crl anchor \"fleet\": fetching {} failed",
            server.url()
        )),
        "{health}"
    );
    assert!(health.contains("cannot connect"), "{health}");
    fx.client(&revoked)
        .connect_v5(broker.mqtt, "r")
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(
        fx.client(&good).connect_v5(broker.mqtt, "g").await,
        Outcome::Accepted
    );
    // A restart while the server is still down starts from the copy in data_dir.
    broker.signal("TERM");
    assert!(broker.wait_exit(crate::common::WAIT).await.success());
    let broker = Proc::start(&fx, &path).await;
    wait_metric_at_least(&broker, FAILURES, 1.0).await;
    fx.client(&revoked)
        .connect_v5(broker.mqtt, "r")
        .await
        .assert_tls_alert("CertificateRevoked");
    assert_eq!(
        fx.client(&good).connect_v5(broker.mqtt, "g").await,
        Outcome::Accepted
    );
}

#[tokio::test]
async fn a_crl_with_a_forged_signature_is_refused_and_the_last_good_kept() {
    let fx = Fixture::new();
    let d1 = fx.device("d1.devices.example.com");
    let server = CrlServer::start(Answer::Body(crl(&fx.fleet, &[], HOUR))).await;
    let broker = Proc::start(&fx, &config(&fx, &fleet_from(&server.url()))).await;
    wait_metric_at_least(&broker, LAST_SUCCESS, 1.0).await;
    let mut s1 = open_v5(&fx.client(&d1), broker.mqtt, "s1").await;
    // Same issuer name as the fleet CA, another key: a CRL anyone could make.
    let forger = Ca::root("Test Fleet CA", Validity::days(-1, 30)).expect("forger");
    server.set(Answer::Body(crl(&forger, &[d1.serial], HOUR / 2)));
    wait_metric_at_least(&broker, FAILURES, 1.0).await;
    let (_, health) = broker.get("/healthz").await;
    assert!(health.contains("signature does not verify"), "{health}");
    s1.ping().await;
    assert_eq!(
        fx.client(&d1).connect_v5(broker.mqtt, "again").await,
        Outcome::Accepted
    );
}

/// A CRL older than the one in force, replayed over plain HTTP, would unrevoke.
#[tokio::test]
async fn an_older_crl_is_refused() {
    let fx = Fixture::new();
    let d1 = fx.device("d1.devices.example.com");
    let server = CrlServer::start(Answer::Body(crl(&fx.fleet, &[d1.serial], HOUR / 2))).await;
    let broker = Proc::start(&fx, &config(&fx, &fleet_from(&server.url()))).await;
    wait_metric_at_least(&broker, LAST_SUCCESS, 1.0).await;
    server.set(Answer::Body(crl(&fx.fleet, &[], HOUR)));
    wait_metric_at_least(&broker, FAILURES, 1.0).await;
    let (_, health) = broker.get("/healthz").await;
    assert!(
        health.contains("is not newer than the one in force"),
        "{health}"
    );
    fx.client(&d1)
        .connect_v5(broker.mqtt, "d1")
        .await
        .assert_tls_alert("CertificateRevoked");
}

/// Fail-closed for the anchor, not for the broker: with no CRL at all (never fetched, no
/// `crl` file) the anchor's certificates are refused, pinned devices are served, and the
/// anchor opens by itself at the first good fetch.
#[tokio::test]
async fn without_any_crl_the_anchor_refuses_until_the_first_good_fetch() {
    let fx = Fixture::new();
    let d1 = fx.device("d1.devices.example.com");
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    let server = CrlServer::start(Answer::Status(503)).await;
    let path = config(
        &fx,
        &format!(
            "{}\n{}",
            fleet_from(&server.url()),
            pinned("meter-7", "meter-7.pem", "device")
        ),
    );
    // `check` says what serve will do.
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains("no CRL fetched from") && run.stdout.contains("accepts no certificate"),
        "{run:#?}"
    );
    let mut broker = Proc::start(&fx, &path).await;
    // The alert OpenSSL and rustls send when revocation status cannot be determined.
    fx.client(&d1)
        .connect_v5(broker.mqtt, "d1")
        .await
        .assert_tls_alert("UnknownCA");
    assert_eq!(
        broker
            .metric("certmq_auth_refusals_total{reason=\"crl_unavailable\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        Client::new(&fx, &meter.cert_pem, &meter.key_pem)
            .connect_v5(broker.mqtt, "m")
            .await,
        Outcome::Accepted
    );
    let (_, health) = broker.get("/healthz").await;
    assert!(health.contains("HTTP status 503"), "{health}");
    assert!(
        health.contains("the anchor accepts no certificate"),
        "{health}"
    );
    server.set(Answer::Body(crl(&fx.fleet, &[], HOUR)));
    broker.wait_line("CRL updated from crl_url").await;
    assert_eq!(
        fx.client(&d1).connect_v5(broker.mqtt, "d1").await,
        Outcome::Accepted
    );
}

#[test]
fn check_refuses_a_bad_crl_url_or_refresh() {
    let fx = Fixture::new();
    let path = fx.config(&format!(
        "{}crl_url = \"https://ca.example.com/fleet.crl\"\ncrl_refresh = 0\n\n[[anchor]]\nname = \"other\"\ncertificate = \"root.pem\"\ncn_regex = '^(.+)$'\ncrl_refresh = 60\n",
        Fixture::fleet_anchor(true)
    ));
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    for expected in [
        "anchor[0] \"fleet\".crl_url: invalid crl_url \"https://ca.example.com/fleet.crl\": only http:// is supported",
        "anchor[1] \"other\".crl_refresh: crl_refresh is set without crl_url",
    ] {
        assert!(run.stderr.contains(expected), "{expected:?} not in {run:#?}");
    }
    let path = fx.config(&format!(
        "{}crl_url = \"http://127.0.0.1:9/fleet.crl\"\ncrl_refresh = 0\n",
        Fixture::fleet_anchor(true)
    ));
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert!(
        run.stderr
            .contains("crl_refresh must be between 1 and 604800 seconds, not 0"),
        "{run:#?}"
    );
}
