//! CRLs from their distribution points (docs/crl.md): each anchor with a `crl_url` has its
//! CRL fetched before the first connection is accepted, then every `crl_refresh` seconds.
//!
//! A fetched CRL is put in force only when it is good: checked against the anchor exactly
//! as a `crl` file is (issuer, signature, cRLSign), and newer than the CRL in force (a
//! CRL replayed over plain HTTP could otherwise unrevoke a certificate). It is then kept
//! in `data_dir/crl/` (the next start and every reload read it there) and applied like a
//! reload applies a changed CRL file: the config in force with the new CRL is swapped in
//! and every live session is re-checked ([`Shared::apply_crl`], the reload's own path), so
//! a newly revoked certificate loses its connections within one refresh, without SIGHUP.
//!
//! A fetch that fails (unreachable, HTTP error, bad signature, not newer) changes nothing:
//! the CRL in force stays. Failures are counted per anchor
//! (`certmq_crl_fetch_failures_total`), shown in `/healthz`, and logged at the first
//! failure in a row and then at powers of two of the count (a refresh every second must
//! not write a line every second). After a failure the next attempt comes after
//! `min(crl_refresh, 60 s)`.

mod http;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::cert::{now_secs, rfc3339};
use crate::config::{crl, Config, CrlUrl};

pub use http::FetchError;

/// The longest wait before retrying a failed fetch.
const RETRY: Duration = Duration::from_secs(60);

/// The distribution points of the config in force, and how their fetches went.
#[derive(Debug, Default)]
pub struct CrlWatch {
    /// By anchor name. std Mutex: short updates, never held across an await.
    watched: Mutex<BTreeMap<String, Watched>>,
    /// Woken by a reload: anchors with a new `crl_url` are fetched at once.
    wake: Notify,
}

/// One anchor's distribution point.
#[derive(Debug, Clone)]
pub struct Watched {
    pub url: CrlUrl,
    pub refresh: Duration,
    /// When the next fetch is due.
    next: Instant,
    /// When a fetch last succeeded (seconds since the epoch).
    pub last_success: Option<i64>,
    /// The last failure: when, and why.
    pub last_failure: Option<(i64, String)>,
    /// Failures since the last success.
    pub failures_in_a_row: u64,
}

impl CrlWatch {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Watched>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next round start now (after a reload).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The watched distribution points, by anchor name.
    pub fn snapshot(&self) -> BTreeMap<String, Watched> {
        self.lock().clone()
    }

    /// Follows the config in force: new or changed distribution points are due now,
    /// those of anchors gone or without `crl_url` are forgotten. Returns those due at
    /// `now`, their next attempt pushed back by their period meanwhile.
    fn due(
        &self,
        config: &Config,
        now: Instant,
        metrics: &crate::metrics::Metrics,
    ) -> Vec<(String, CrlUrl)> {
        let mut watched = self.lock();
        let wanted: BTreeMap<&str, (&CrlUrl, Duration)> = config
            .anchors
            .iter()
            .filter_map(|a| {
                let url = a.crl_url.as_ref()?;
                Some((a.name.as_str(), (url, Duration::from_secs(a.crl_refresh))))
            })
            .collect();
        watched.retain(|name, w| {
            let keep = wanted
                .get(name.as_str())
                .is_some_and(|(url, _)| **url == w.url);
            if !keep {
                metrics.crl_unwatched(name);
            }
            keep
        });
        let mut due = Vec::new();
        for (name, (url, refresh)) in wanted {
            let w = watched.entry(name.to_owned()).or_insert_with(|| {
                metrics.crl_watched(name);
                Watched {
                    url: url.clone(),
                    refresh,
                    next: now,
                    last_success: None,
                    last_failure: None,
                    failures_in_a_row: 0,
                }
            });
            w.refresh = refresh;
            if w.next <= now {
                w.next = now + refresh;
                due.push((name.to_owned(), url.clone()));
            }
        }
        due
    }

    /// When the next fetch is due, if any distribution point is watched.
    fn next_due(&self) -> Option<Instant> {
        self.lock().values().map(|w| w.next).min()
    }

    /// Records the outcome of a fetch; returns the failures in a row (0 after a success).
    fn record(&self, anchor: &str, url: &CrlUrl, outcome: Result<(), String>) -> u64 {
        let mut watched = self.lock();
        let Some(w) = watched.get_mut(anchor).filter(|w| w.url == *url) else {
            return 0;
        };
        match outcome {
            Ok(()) => {
                w.last_success = Some(now_secs());
                w.failures_in_a_row = 0;
            }
            Err(why) => {
                w.last_failure = Some((now_secs(), why));
                w.failures_in_a_row += 1;
                let retry = w.refresh.min(RETRY);
                w.next = w.next.min(Instant::now() + retry);
            }
        }
        w.failures_in_a_row
    }

    /// What `/healthz` says about CRLs: one line per anchor whose CRL is missing, stale,
    /// or whose last fetch failed; nothing when all is well.
    pub fn health(&self, config: &Config) -> Vec<String> {
        let watched = self.snapshot();
        let now = now_secs();
        let mut lines = Vec::new();
        for a in &config.anchors {
            let in_force = match &a.crl {
                Some(c) => format!(
                    "the CRL in force is of {}{}",
                    rfc3339(c.this_update),
                    c.next_update
                        .map(|n| format!(", next update {}", rfc3339(n)))
                        .unwrap_or_default()
                ),
                None => "no CRL is in force: the anchor accepts no certificate".to_owned(),
            };
            let stale = a
                .crl
                .as_ref()
                .and_then(|c| c.next_update)
                .filter(|n| *n < now);
            let failing = watched.get(&a.name).and_then(|w| {
                let (at, why) = w.last_failure.as_ref()?;
                (w.failures_in_a_row > 0).then(|| {
                    format!(
                        "fetching {} failed {} time(s) in a row, last at {}: {why}",
                        w.url,
                        w.failures_in_a_row,
                        rfc3339(*at)
                    )
                })
            });
            let missing = a.crl_url.is_some() && a.crl.is_none();
            if let Some(f) = failing {
                lines.push(format!("crl anchor {:?}: {f}; {in_force}", a.name));
            } else if missing {
                lines.push(format!("crl anchor {:?}: {in_force}", a.name));
            } else if let Some(n) = stale {
                lines.push(format!(
                    "crl anchor {:?}: the CRL in force is past its nextUpdate ({}); it is still applied",
                    a.name,
                    rfc3339(n)
                ));
            }
        }
        lines
    }
}

/// Fetches every distribution point that is due, all at once, and waits for them.
pub async fn round(shared: &Arc<Shared>) {
    let config = shared.snapshot().config.clone();
    let due = shared.crls.due(&config, Instant::now(), &shared.metrics);
    let mut fetches = tokio::task::JoinSet::new();
    for (anchor, url) in due {
        let shared = shared.clone();
        fetches.spawn(async move { refresh(&shared, &anchor, &url).await });
    }
    while fetches.join_next().await.is_some() {}
}

/// Runs rounds until `shutdown`: at the next due time, or at once after a reload.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let next = shared.crls.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.crls.wake.notified() => {}
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = round(&shared) => {}
        }
    }
}

/// What one fetch did.
enum Fetched {
    /// The same CRL as the one in force (`stale`: past its nextUpdate).
    Unchanged { stale: bool },
    /// A newer CRL, now in force.
    Applied {
        revoked: usize,
        next_update: Option<i64>,
        sessions_revoked: usize,
        /// It is already past its nextUpdate (applied all the same: it is newer than
        /// what was in force; counted and shown as a failure).
        stale: bool,
    },
    /// The anchor lost this URL meanwhile (a reload): nothing to do.
    Gone,
}

/// Why a fetched CRL was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("fetch failed")]
    Fetch(#[from] FetchError),
    #[error("the fetched CRL {0}")]
    Invalid(#[source] crl::CrlError),
    #[error("the fetched CRL (thisUpdate {fetched}) is not newer than the one in force (thisUpdate {in_force}); refused: an older CRL could unrevoke certificates")]
    NotNewer { fetched: String, in_force: String },
    #[error("the fetched CRL is past its nextUpdate ({0})")]
    Stale(String),
    #[error("cannot apply the CRL")]
    Apply(#[source] super::ServerError),
    #[error("the CRL task failed: {0}")]
    Task(String),
}

/// Fetches one anchor's CRL and puts it in force when it is good; records and logs the
/// outcome.
async fn refresh(shared: &Arc<Shared>, anchor: &str, url: &CrlUrl) {
    let outcome = fetch_and_apply(shared, anchor, url).await;
    let failed = match &outcome {
        Ok(Fetched::Gone) => return,
        Ok(Fetched::Applied {
            stale: true,
            next_update,
            ..
        }) => Some(stale_why(*next_update)),
        Ok(Fetched::Unchanged { stale: true }) => {
            let next = shared
                .snapshot()
                .config
                .anchor(anchor)
                .and_then(|a| a.crl.as_ref()?.next_update);
            Some(stale_why(next))
        }
        Ok(_) => None,
        Err(e) => Some(sentence(e)),
    };
    let failures = shared.crls.record(
        anchor,
        url,
        match &failed {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        },
    );
    match &failed {
        Some(_) => shared.metrics.crl_fetch_failed(anchor),
        None => shared.metrics.crl_fetched(anchor, now_secs()),
    }
    if let Ok(Fetched::Applied {
        revoked,
        next_update,
        sessions_revoked,
        ..
    }) = &outcome
    {
        tracing::info!(
            anchor,
            url = %url,
            revoked,
            next_update = %next_update.map(rfc3339).unwrap_or_else(|| "-".to_owned()),
            sessions_revoked,
            "CRL updated from crl_url"
        );
    }
    if let Some(why) = failed {
        if failures.is_power_of_two() {
            tracing::warn!(
                anchor,
                url = %url,
                failures,
                error = ?why,
                "CRL fetch failed; the CRL in force stays"
            );
        }
    }
}

async fn fetch_and_apply(
    shared: &Arc<Shared>,
    anchor: &str,
    url: &CrlUrl,
) -> Result<Fetched, RefreshError> {
    let bytes = http::get(url).await?;
    let config = shared.snapshot().config.clone();
    let Some(a) = config
        .anchor(anchor)
        .filter(|a| a.crl_url.as_ref() == Some(url))
    else {
        return Ok(Fetched::Gone);
    };
    // Parsing and the signature check of a large CRL take a few milliseconds of CPU.
    let (der, info) = (a.der.clone(), a.info.clone());
    let verified = tokio::task::spawn_blocking(move || crl::verify(&bytes, &der, &info))
        .await
        .map_err(|e| RefreshError::Task(e.to_string()))?
        .map_err(RefreshError::Invalid)?;
    if let Some(current) = &a.crl {
        if current.der == verified.der {
            return Ok(Fetched::Unchanged {
                stale: verified.is_stale(now_secs()),
            });
        }
        if verified.this_update <= current.this_update {
            return Err(RefreshError::NotNewer {
                fetched: rfc3339(verified.this_update),
                in_force: rfc3339(current.this_update),
            });
        }
    }
    let stale = verified.is_stale(now_secs());
    let path = crl::stored_path(&config.server.data_dir, anchor);
    let (revoked, next_update) = (verified.revoked_count, verified.next_update);
    let der = verified.der.clone();
    let to = path.clone();
    match tokio::task::spawn_blocking(move || store(&to, &der)).await {
        Ok(Ok(())) => {}
        // Applied all the same: the revocations count now; the next start or reload
        // falls back to the previous copy until a later fetch is stored.
        Ok(Err(e)) => {
            tracing::error!(anchor, path = %path.display(), error = %e, "cannot keep the fetched CRL in data_dir")
        }
        Err(e) => tracing::error!(anchor, error = %e, "the task keeping the fetched CRL failed"),
    }
    let crl = Arc::new(verified.at(path, Some(url.url.clone())));
    let (s, name, u) = (shared.clone(), anchor.to_owned(), url.clone());
    let applied = tokio::task::spawn_blocking(move || s.apply_crl(&name, &u, crl))
        .await
        .map_err(|e| RefreshError::Task(e.to_string()))?
        .map_err(RefreshError::Apply)?;
    Ok(match applied {
        Some(recheck) => Fetched::Applied {
            revoked,
            next_update,
            sessions_revoked: recheck.revoked,
            stale,
        },
        None => Fetched::Gone,
    })
}

/// Writes the last good copy: a temporary file, synced, renamed over the previous one,
/// so a crash leaves either copy whole.
fn store(path: &std::path::Path, der: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("crl.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(der)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The failure recorded for a CRL served past its nextUpdate.
fn stale_why(next_update: Option<i64>) -> String {
    RefreshError::Stale(next_update.map(rfc3339).unwrap_or_default()).to_string()
}

/// An error and its causes as one line.
fn sentence(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
