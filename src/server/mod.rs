//! The listener: accept loop, connection limit, shared state, graceful shutdown.
//!
//! `Server::run(listener, shutdown)` is the whole broker, so tests start a real one on
//! `127.0.0.1:0` and `main` wires it to signals. The accept loop only accepts: each
//! connection's TLS handshake, CONNECT and session run in the connection's own task
//! (`connection.rs`), under the timeouts of `[limits]`, so a slow or silent peer can never
//! stall other clients.
//!
//! Config and TLS state are immutable and swapped whole (`Shared::current`): a
//! connection takes a snapshot at accept for its handshake and another at CONNECT for the
//! admission, so a reload takes effect for every new decision at once.

mod admin;
mod admit;
mod connection;
pub mod control;
pub mod crl_refresh;
pub mod live;
mod metered;
mod proxy;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::{Config, ConfigError, Problem, ProblemKind};
use crate::metrics::Metrics;
use crate::registry::{Backend, Feed, Mode, Registry, RegistryError};
use crate::storage::Store;
use crate::tls::{self, TlsError};

/// How long shutdown waits for connections to finish after telling them to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often pending `last_seen_at` values are written.
const LAST_SEEN_FLUSH: Duration = Duration::from_secs(1);

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the device registry")]
    Registry(#[from] RegistryError),
    #[error("cannot open the message store")]
    Store(#[from] crate::storage::StoreError),
    #[error("cannot join the cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A config and the TLS acceptor built from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub acceptor: TlsAcceptor,
}

/// State shared by every connection.
pub struct Shared {
    /// The current snapshot. std RwLock: read for an Arc clone per connection, written only
    /// by a reload; never held across an await.
    current: RwLock<Arc<Snapshot>>,
    /// The device registry: SQLite in `data_dir`, or the cluster's bucket (docs/cluster.md).
    pub registry: Arc<dyn Backend>,
    pub metrics: Arc<Metrics>,
    /// Sessions, subscriptions, retained messages.
    pub broker: Arc<Broker>,
    /// Admitted connections, re-checked on reload and on registry changes.
    pub live: live::Live,
    /// Cluster mode: this node's NATS connection, set once by [`Server::join_cluster`]
    /// before anything is accepted; unset when standalone.
    pub cluster: std::sync::OnceLock<crate::cluster::Node>,
    /// Serialises reloads (a SIGHUP storm runs them one after the other) and the CRLs
    /// fetched from distribution points.
    reloading: Mutex<()>,
    /// The anchors' CRL distribution points and how their fetches went.
    pub crls: crl_refresh::CrlWatch,
    /// This broker's exclusive claim on `data_dir`, held as long as anything runs.
    _lock: control::DataDirLock,
}

impl Shared {
    /// The current config and acceptor.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A broker ready to run.
pub struct Server {
    shared: Arc<Shared>,
    /// Cluster mode: the registry bucket, read by [`Server::join_cluster`].
    kv: Option<Arc<crate::cluster::registry::KvRegistry>>,
    /// Cluster mode: the session store (the broker's journal), started by
    /// [`Server::join_cluster`].
    sessions: Option<Arc<crate::cluster::sessions::SessionStore>>,
    /// Restored offline sessions with an expiry deadline, timed from `run`.
    deadlines: Mutex<Vec<(crate::broker::session::SessionRef, i64)>>,
}

impl Server {
    /// Opens the registry in `data_dir`, enters the pinned devices (a pinned name the
    /// registry holds for an anchor is a config error), and builds the TLS config. In
    /// cluster mode the registry is the cluster's bucket, read by [`Server::join_cluster`].
    pub fn new(config: Config) -> Result<Server, ServerError> {
        // Before any database is opened: two brokers never share a data_dir (contract §1).
        let lock = control::DataDirLock::acquire(&config.server.data_dir)?;
        let (registry, kv, recreated): (Arc<dyn Backend>, _, _) = match &config.cluster {
            None => {
                let (registry, recreated) = open_registry(&config)?;
                (registry, None, recreated)
            }
            Some(settings) => {
                let kv = Arc::new(crate::cluster::registry::KvRegistry::new(settings));
                (kv.clone(), Some(kv), Vec::new())
            }
        };
        // Standalone, sessions and retained messages are in SQLite; in cluster mode they
        // live in JetStream (docs/cluster.md), so nothing is recovered from disk.
        let (backend, mut recovered, sessions): (Arc<dyn crate::broker::journal::Backend>, _, _) =
            match &config.cluster {
                None => {
                    let (store, recovered) = Store::open(&config.server.data_dir)?;
                    (Arc::new(store), recovered, None)
                }
                Some(settings) => {
                    let sessions = crate::cluster::sessions::SessionStore::new(settings);
                    (sessions.clone(), Default::default(), Some(sessions))
                }
            };
        let metrics = Arc::new(Metrics::default());
        let journal = crate::broker::journal::Journal::new(backend);
        let broker = Broker::new(metrics.clone(), Some(journal));
        broker.set_stall_timeout(config.limits.stall_timeout);
        broker.cap_restored_expiry(&mut recovered, config.limits.max_session_expiry);
        broker.set_retained_quota(config.limits.max_retained_per_device);
        let restored = recovered.sessions.len();
        let retained = recovered.retained.len();
        let deadlines = broker.restore(
            recovered,
            |_| Arc::new(crate::acl::DeviceAcl::default()),
            config.limits.max_queued_messages,
        );
        if restored + retained > 0 {
            tracing::info!(
                sessions = restored,
                retained,
                "restored from the message store"
            );
        }
        // The cluster's registry is read once the node joined (join_cluster).
        if kv.is_none() {
            reauthorize_restored(&broker, &config, registry.as_ref(), &recreated)?;
        }
        metrics.set_config_gauges(config.gauges());
        metrics.started();
        let config = Arc::new(config);
        let known: Arc<dyn tls::KnownDevices> = registry.clone();
        let tls = tls::server_config(config.clone(), metrics.clone(), Some(known))?;
        let snapshot = Snapshot {
            config,
            acceptor: TlsAcceptor::from(tls),
        };
        Ok(Server {
            kv,
            sessions,
            deadlines: Mutex::new(deadlines),
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(snapshot)),
                registry,
                broker,
                metrics,
                live: live::Live::default(),
                cluster: std::sync::OnceLock::new(),
                reloading: Mutex::new(()),
                crls: crl_refresh::CrlWatch::default(),
                _lock: lock,
            }),
        })
    }

    /// Cluster mode (`[cluster]` in the config): connects to NATS and sets up this node's
    /// part of the shared state. Does nothing when standalone. Called once, before `run`.
    pub async fn join_cluster(&self) -> Result<(), ServerError> {
        let config = self.config();
        let Some(settings) = &config.cluster else {
            return Ok(());
        };
        let Some(sessions) = self.sessions.clone() else {
            return Ok(());
        };
        let node =
            crate::cluster::Node::join(settings, self.shared.broker.clone(), sessions).await?;
        if let Some(kv) = &self.kv {
            self.join_registry(kv, &node.cluster).await?;
        }
        node.wills
            .inherit(self.shared.broker.clone(), will_gates(&self.shared));
        let cluster = &node.cluster;
        tracing::info!(
            node = %cluster.node(),
            nats = %settings.nats.join(","),
            prefix = %cluster.names.prefix(),
            replicas = cluster.replicas(),
            "joined the cluster"
        );
        let _ = self.shared.cluster.set(node);
        Ok(())
    }

    /// Cluster mode: reads the registry bucket into this node's mirror, enters the pinned
    /// devices, and holds the restored sessions to it (as [`Server::new`] does standalone).
    async fn join_registry(
        &self,
        kv: &crate::cluster::registry::KvRegistry,
        cluster: &crate::cluster::Cluster,
    ) -> Result<(), ServerError> {
        kv.attach(cluster).await?;
        let (config, shared) = (self.config(), self.shared.clone());
        tokio::task::spawn_blocking(move || {
            let recreated = sync_pinned(&config, shared.registry.as_ref(), Mode::Commit)?;
            reauthorize_restored(
                &shared.broker,
                &config,
                shared.registry.as_ref(),
                &recreated,
            )
        })
        .await
        .map_err(|e| {
            ServerError::Cluster(crate::cluster::ClusterError::jetstream(
                "entering the pinned devices",
                e,
            ))
        })?
    }

    /// The broker's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The state shared with connections (reload, admin endpoint, tests).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The current config.
    pub fn config(&self) -> Arc<Config> {
        self.shared.snapshot().config.clone()
    }

    /// Binds `server.bind` from the config.
    pub async fn bind(&self) -> Result<TcpListener, ServerError> {
        let addr = self.config().server.bind;
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    }

    /// Binds `admin_bind` from the config, when set.
    pub async fn bind_admin(&self) -> Result<Option<TcpListener>, ServerError> {
        let Some(addr) = self.config().server.admin_bind else {
            return Ok(None);
        };
        TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| ServerError::Bind { addr, source })
    }

    /// [`Server::run_with_admin`] with the admin endpoint bound from the config.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let admin = self.bind_admin().await?;
        self.run_with_admin(listener, admin, shutdown).await
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, tells connections to
    /// stop (MQTT 5 clients get DISCONNECT 0x8B), waits up to [`SHUTDOWN_GRACE`], and
    /// flushes the registry. `admin`, when given, serves `/healthz` and `/metrics`.
    pub async fn run_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let shared = self.shared;
        let deadlines =
            std::mem::take(&mut *self.deadlines.lock().unwrap_or_else(|p| p.into_inner()));
        shared.broker.schedule_expiry(deadlines);
        let admin_task =
            admin.map(|l| tokio::spawn(admin::serve(l, shared.clone(), shutdown.clone())));
        let max = shared.snapshot().config.limits.max_connections;
        let slots = Arc::new(Semaphore::new(max));
        let tracker = TaskTracker::new();
        // `certmq reload` reaches this broker through its data_dir. Without the socket
        // (e.g. a data_dir path too long for one) SIGHUP still reloads.
        let data_dir = shared.snapshot().config.server.data_dir.clone();
        let control_task = match control::bind(&data_dir) {
            Ok(l) => Some(tokio::spawn(control::serve(
                l,
                shared.clone(),
                shutdown.clone(),
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "no control socket: `certmq reload` cannot reach this broker, SIGHUP still reloads");
                None
            }
        };
        let flusher = tokio::spawn(flush_last_seen(
            shared.registry.clone(),
            shared.metrics.clone(),
            shutdown.clone(),
        ));
        let watcher = tokio::spawn(watch_registry(shared.clone(), shutdown.clone()));
        // CRLs from distribution points: fetched once before the first connection is
        // accepted, then every crl_refresh seconds (docs/crl.md).
        crl_refresh::round(&shared).await;
        let crl_task = tokio::spawn(crl_refresh::run(shared.clone(), shutdown.clone()));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "listening for MQTT over TLS");
        }
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // contract §9: at max_connections new connections are refused at once.
                tracing::warn!(%peer, max, "refused: max_connections reached");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tracker.spawn(connection::handle(
                tcp,
                peer,
                shared.clone(),
                shutdown.clone(),
                permit,
            ));
        }
        drop(listener);
        tracker.close();
        tracing::info!(connections = tracker.len(), "shutting down");
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "grace period over; closing the rest"
            );
        }
        // Cluster mode: the wills still waiting out their delay go to the other nodes.
        if let Some(node) = shared.cluster.get() {
            node.wills.stop(SHUTDOWN_GRACE).await;
        }
        let _ = flusher.await;
        let _ = watcher.await;
        let _ = crl_task.await;
        if let Some(t) = control_task {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(data_dir.join(control::SOCKET_FILE));
        // Everything the sessions submitted on their way out is committed before exit, and
        // both write-ahead logs are checkpointed: each .db file alone is then the whole
        // store, for a copy or a backup (contract §7).
        if let Some(journal) = shared.broker.journal() {
            match journal.close().await {
                Err(e @ crate::broker::journal::CommitError::Checkpoint(_)) => {
                    tracing::warn!(error = %e, "message store not checkpointed at stop")
                }
                Err(e) => tracing::error!(error = %e, "final store flush failed"),
                Ok(()) => {}
            }
        }
        let registry = shared.registry.clone();
        match tokio::task::spawn_blocking(move || registry.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "registry not checkpointed at stop"),
            Err(e) => tracing::warn!(error = %e, "registry close did not run"),
        }
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        Ok(())
    }
}

/// contract §3 step 7: a pinned name that the registry holds for an anchor is a config error.
/// With `Mode::Commit` the pinned devices are entered when there is no conflict. Returns
/// the pinned names whose registry row was missing and is now created (contract §4: a deleted
/// pinned row is recreated at start and on reload, as a new entry).
pub fn sync_pinned(
    config: &Config,
    registry: &dyn Backend,
    mode: Mode,
) -> Result<Vec<String>, ServerError> {
    let sync = registry.sync_pinned(&config.devices, mode)?;
    if sync.conflicts.is_empty() {
        return Ok(sync.created);
    }
    let problems = sync
        .conflicts
        .into_iter()
        .map(|(name, source_name)| Problem {
            file: config.path.clone(),
            field: format!("device {name:?}"),
            kind: ProblemKind::PinnedNameTaken { name, source_name },
        })
        .collect();
    Err(ServerError::Config(ConfigError {
        path: config.path.clone(),
        problems,
    }))
}

/// Writes `last_seen_at` and the per-device drop counts every second, and once more at
/// shutdown.
async fn flush_last_seen(
    registry: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(LAST_SEEN_FLUSH);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        for (device, n) in metrics.take_device_drops() {
            registry.count_dropped(&device, n);
        }
        let r = registry.clone();
        match tokio::task::spawn_blocking(move || r.flush_last_seen()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot record last_seen_at"),
            Err(e) => tracing::warn!(error = %e, "last_seen_at flush task failed"),
        }
        if stop {
            return;
        }
    }
}

/// How often the registry is polled for changes made by the `certmq devices` CLI. contract §1
/// asks for disconnection within 2 seconds; SQLite's `data_version` makes a poll cheap.
const REGISTRY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Cluster mode: the check a will of a node that died passes before this node publishes
/// it (the same as its own delayed wills pass, `admit::will_gate`). Holds the server
/// weakly: the cluster side lives inside it.
fn will_gates(shared: &Arc<Shared>) -> crate::broker::remote::WillGates {
    let weak = Arc::downgrade(shared);
    Arc::new(move |device, presenter| match weak.upgrade() {
        Some(shared) => admit::will_gate(&shared, device, presenter),
        None => Arc::new(|_| Err("the server stopped".to_owned())),
    })
}

/// Re-checks live sessions when another process changed the registry: polled (SQLite),
/// or as the backend pushes changes (the cluster's KV watch, `live::follow`).
async fn watch_registry(shared: Arc<Shared>, shutdown: CancellationToken) {
    if let Feed::Push(feed) = shared.registry.feed() {
        return live::follow(shared, feed, shutdown).await;
    }
    let mut tick = tokio::time::interval(REGISTRY_POLL);
    let mut seen: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = shared.clone();
        let changed = tokio::task::spawn_blocking(move || {
            let version = s.registry.data_version().ok()?;
            Some(version)
        })
        .await
        .ok()
        .flatten();
        let Some(version) = changed else { continue };
        if seen.is_some_and(|v| v != version) {
            let s = shared.clone();
            let result = tokio::task::spawn_blocking(move || {
                // The change is committed (its data_version was read): connections admitted
                // on the old rows that register after this re-check's copy of the list
                // re-check themselves.
                s.live.registry_changed();
                let config = s.snapshot().config.clone();
                let scope = live::Scope::All { revalidate: false };
                s.live.recheck(&config, &s.registry, &s.broker, scope)
            })
            .await;
            match result {
                Ok(Ok(r)) if r.revoked + r.sessions_forgotten > 0 => tracing::info!(
                    revoked = r.revoked,
                    kept = r.kept,
                    forgotten = r.sessions_forgotten,
                    "registry changed: sessions re-checked"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "registry re-check failed; keeping sessions")
                }
                Err(e) => tracing::warn!(error = %e, "registry re-check task failed"),
            }
        }
        seen = Some(version);
    }
}

/// Standalone: opens the SQLite registry in `data_dir`, checks it, and enters the pinned
/// devices (the first write: a read-only or full store fails now, naming its file).
fn open_registry(config: &Config) -> Result<(Arc<dyn Backend>, Vec<String>), ServerError> {
    let registry = Arc::new(Registry::open(&config.server.data_dir)?);
    // Before the first write: a damaged registry is refused (the message store checks its
    // own file as it opens).
    registry.quick_check()?;
    let recreated = sync_pinned(config, registry.as_ref(), Mode::Commit).map_err(|e| match e {
        ServerError::Registry(RegistryError::Sqlite(source)) => {
            ServerError::Registry(RegistryError::Open {
                path: registry.path().to_path_buf(),
                source,
            })
        }
        other => other,
    })?;
    // Refusal lines name the device of a refused certificate (one indexed lookup).
    registry.index_fingerprints()?;
    Ok((registry, recreated))
}

/// Contract §4: restored sessions answer to the current config and registry like any other. A
/// pinned row recreated just now is a new entry: what was left under its name belonged to
/// the deleted one.
fn reauthorize_restored(
    broker: &Broker,
    config: &Config,
    registry: &dyn Backend,
    recreated: &[String],
) -> Result<(), ServerError> {
    for name in recreated {
        if let Ok(device) = crate::identity::DeviceName::parse(name) {
            broker.forget_device(&device);
        }
    }
    let rows: std::collections::HashMap<String, crate::registry::Device> = registry
        .list()?
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
    let now = rustls_pki_types::UnixTime::now();
    broker.reauthorize(None, |device| {
        crate::auth::standing(config, rows.get(device.as_str()), device, None, false, now)
            .map(|p| Arc::new(p.for_device(device.as_str())))
    });
    Ok(())
}

/// What a reload did, for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct ReloadOutcome {
    pub recheck: live::Recheck,
}

impl Shared {
    /// contract §8: re-reads the config file; on any problem keeps the old config and returns
    /// every problem; on success swaps config and TLS atomically for new connections and
    /// re-checks every live session. Blocking: call from `spawn_blocking`.
    pub fn reload(&self) -> Result<ReloadOutcome, ServerError> {
        let _serial = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.snapshot().config.path.clone();
        let outcome = self.reload_from(&path);
        self.metrics.reloaded(outcome.is_ok());
        outcome
    }

    fn reload_from(&self, path: &std::path::Path) -> Result<ReloadOutcome, ServerError> {
        let config = Config::load(path)?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let recreated = sync_pinned(&config, self.registry.as_ref(), Mode::Commit)?;
        let recheck = self.put_in_force(Arc::new(config), &recreated)?;
        // Anchors with a new or changed crl_url are fetched now, not at the next tick.
        self.crls.wake();
        Ok(ReloadOutcome { recheck })
    }

    /// Puts `crl`, fetched from `url`, in force for `anchor` (docs/crl.md): the config in
    /// force with that CRL, swapped in like a reload, and every live session re-checked
    /// the way a reload re-checks it. None when the anchor no longer has that URL, or a
    /// reload meanwhile put a CRL as new in force. Blocking: call from `spawn_blocking`.
    pub fn apply_crl(
        &self,
        anchor: &str,
        url: &crate::config::CrlUrl,
        crl: Arc<crate::config::Crl>,
    ) -> Result<Option<live::Recheck>, ServerError> {
        let _serial = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot().config.clone();
        let newer = current
            .anchor(anchor)
            .and_then(|a| a.crl.as_ref())
            .is_none_or(|c| crl.this_update > c.this_update);
        if !newer {
            return Ok(None);
        }
        let Some(config) = current.with_crl(anchor, url, crl) else {
            return Ok(None);
        };
        self.put_in_force(Arc::new(config), &[]).map(Some)
    }

    /// Swaps `config` in for new connections, then holds every live session to it.
    /// `recreated`: pinned names whose registry row is new (their old sessions go).
    fn put_in_force(
        &self,
        config: Arc<Config>,
        recreated: &[String],
    ) -> Result<live::Recheck, ServerError> {
        let known: Arc<dyn tls::KnownDevices> = self.registry.clone();
        let tls = tls::server_config(config.clone(), self.metrics.clone(), Some(known))?;
        let snapshot = Arc::new(Snapshot {
            config: config.clone(),
            acceptor: TlsAcceptor::from(tls),
        });
        match self.current.write() {
            Ok(mut cur) => *cur = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        self.metrics.set_config_gauges(config.gauges());
        self.broker.set_stall_timeout(config.limits.stall_timeout);
        self.broker
            .set_retained_quota(config.limits.max_retained_per_device);
        for name in recreated {
            if let Ok(device) = crate::identity::DeviceName::parse(name) {
                self.forget_entry(&device);
            }
        }
        let scope = live::Scope::All { revalidate: true };
        Ok(self
            .live
            .recheck(&config, &self.registry, &self.broker, scope)?)
    }

    /// The registry entry of `device` is new (provisioned, or a pinned row recreated):
    /// whatever was held under its name belonged to a deleted entry (contract §4). Its
    /// connections are revoked and its sessions, queued messages and wills forgotten.
    pub fn forget_entry(&self, device: &crate::identity::DeviceName) {
        let gone = crate::auth::Revoked::Deleted(device.clone());
        self.live.revoke_device(device, &gone);
        self.broker.forget_device(device);
    }
}
