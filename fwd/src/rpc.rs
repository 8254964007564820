//! The Firewall gRPC service: role checks from SO_PEERCRED, conversion of untrusted requests, replies.

use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use guard_proto::v1 as pb;
use guard_proto::v1::firewall_server::Firewall;
use ipnet::IpNet;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::command::{self, Authorize, CallError};
use crate::config::{Mode, Settings};
use crate::engine::{Engine, EngineError};
use crate::model::{AuditEvent, Caller, EventKind, Source, now_ms};
use crate::store::{HistoryFilter, ListFilter, Reader};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Authorize (dnsd).
    Authorizer,
    /// Allow/Revoke and everything a reader may do.
    Admin,
    /// List/History/Status.
    Reader,
}

/// The Firewall service.
pub struct FirewallService {
    engine: Engine,
    reader: Arc<Mutex<Reader>>,
    started: Instant,
    /// Cancelled at shutdown: ends the revocation streams, which graceful shutdown waits for.
    shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for FirewallService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirewallService").finish_non_exhaustive()
    }
}

/// Supplementary groups of `uid` from the group database (SO_PEERCRED carries only the primary gid).
fn member_of(uid: u32, primary_gid: u32, gid: u32) -> bool {
    if primary_gid == gid {
        return true;
    }
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|gs| gs.iter().any(|g| g.as_raw() == gid))
        .unwrap_or(false)
}

/// Decides whether `caller` holds `need`.
pub fn permitted(s: &Settings, caller: &Caller, need: Role) -> bool {
    let (Some(uid), Some(gid)) = (caller.uid, caller.gid) else {
        return false;
    };
    let admin = uid == 0 || s.admin_gid.is_some_and(|g| member_of(uid, gid, g));
    match need {
        Role::Authorizer => s.authorizers.contains(&uid),
        Role::Admin => admin,
        Role::Reader => {
            admin
                || s.authorizers.contains(&uid)
                || s.reader_gid.is_none_or(|g| member_of(uid, gid, g))
        }
    }
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::Conflict(m) => Status::failed_precondition(m),
        EngineError::Stopped => Status::unavailable("fwd is shutting down"),
        other => Status::unavailable(other.to_string()),
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, Status> {
    crate::config::parse_net(s.trim()).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{:?} is not an address or CIDR (host bits must be zero)",
            command::sanitize(s, 64)
        ))
    })
}

fn opt_cidr(s: &str) -> Result<Option<IpNet>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_cidr(s).map(Some)
    }
}

impl FirewallService {
    /// Builds the service.
    pub fn new(
        engine: Engine,
        reader: Reader,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        FirewallService {
            engine,
            reader: Arc::new(Mutex::new(reader)),
            started: Instant::now(),
            shutdown,
        }
    }

    fn caller<T>(req: &Request<T>) -> Caller {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        Caller {
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }

    /// Checks the role; a refusal is audited and answered PERMISSION_DENIED.
    fn require<T>(&self, req: &Request<T>, need: Role, rpc: &str) -> Result<Caller, Status> {
        let caller = Self::caller(req);
        if permitted(&self.engine.settings(), &caller, need) {
            return Ok(caller);
        }
        let who = caller
            .uid
            .map_or_else(|| "unknown peer".to_string(), |u| format!("uid {u}"));
        tracing::warn!(uid = ?caller.uid, pid = ?caller.pid, rpc, "permission denied");
        self.engine.audit(vec![AuditEvent {
            id: 0,
            at_ms: now_ms(),
            kind: EventKind::Denied,
            target: None,
            client: None,
            name: None,
            caller,
            reason: format!("{rpc}: caller lacks the {need:?} role"),
            expires_ms: None,
        }]);
        Err(Status::permission_denied(format!(
            "{who} may not call {rpc}: it needs the {} role",
            match need {
                Role::Authorizer => "authorizer (access.authorizer_uids)",
                Role::Admin => "admin (root or access.admin_group)",
                Role::Reader => "reader (access.reader_group)",
            }
        )))
    }

    /// Validates one Authorize request; a refusal of the whole request is audited here.
    fn parse_authorize(
        &self,
        r: &pb::AuthorizeRequest,
        caller: &Caller,
    ) -> Result<Authorize, CallError> {
        Authorize::parse(r, &self.engine.settings()).inspect_err(|e| {
            self.engine.audit(vec![AuditEvent {
                id: 0,
                at_ms: now_ms(),
                kind: EventKind::Rejected,
                target: None,
                client: guard_proto::ip_from_bytes(&r.client),
                name: command::normalize_name(&r.qname),
                caller: *caller,
                reason: format!("Authorize refused: {e}"),
                expires_ms: None,
            }]);
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let r = reader
                .lock()
                .map_err(|_| Status::internal("reader lock poisoned"))?;
            f(&r).map_err(|e| Status::unavailable(format!("state store: {e}")))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// The stream type of WatchRevocations.
pub type RevocationStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Revocation, Status>> + Send>>;

#[tonic::async_trait]
impl Firewall for FirewallService {
    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let caller = Self::caller(&req);
        let s = self.engine.settings();
        if !(permitted(&s, &caller, Role::Authorizer) || permitted(&s, &caller, Role::Reader)) {
            self.require(&req, Role::Authorizer, "WatchRevocations")?;
        }
        let mut rx = self.engine.revocations();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::Revocation, Status>>(64);
        let everything = || ["0.0.0.0/0", "::/0"].map(|c| pb::Revocation { cidr: c.into() });
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // A new subscriber may have missed anything: forget everything first.
            let mut pending: Vec<pb::Revocation> = everything().into();
            loop {
                for r in pending.drain(..) {
                    if tx.send(Ok(r)).await.is_err() {
                        return; // the subscriber went away
                    }
                }
                let next = tokio::select! {
                    // fwd is stopping: end the stream so graceful shutdown is not held open.
                    _ = shutdown.cancelled() => return,
                    next = rx.recv() => next,
                };
                match next {
                    Ok(net) => pending.push(pb::Revocation {
                        cidr: net.to_string(),
                    }),
                    // Fell behind: it cannot know what it missed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        pending.extend(everything())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn authorize(
        &self,
        req: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let caller = self.require(&req, Role::Authorizer, "Authorize")?;
        let cmd = self
            .parse_authorize(req.get_ref(), &caller)
            .map_err(|e| match e {
                CallError::BatchTooLarge { .. } | CallError::Empty | CallError::ClientRequired => {
                    Status::invalid_argument(e.to_string())
                }
            })?;
        let results = self
            .engine
            .authorize(cmd, caller)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::AuthorizeResponse { results }))
    }

    async fn authorize_many(
        &self,
        req: Request<pb::AuthorizeManyRequest>,
    ) -> Result<Response<pb::AuthorizeManyResponse>, Status> {
        let caller = self.require(&req, Role::Authorizer, "AuthorizeMany")?;
        let max = self.engine.settings().raw.limits.max_batch;
        let reqs = &req.get_ref().requests;
        let total: usize = reqs.iter().map(|r| r.grants.len()).sum();
        if reqs.len() > max || total > max {
            let reason = format!(
                "AuthorizeMany refused: {} requests with {total} grants exceed limits.max_batch = {max}",
                reqs.len()
            );
            self.engine.audit(vec![AuditEvent {
                id: 0,
                at_ms: now_ms(),
                kind: EventKind::Rejected,
                target: None,
                client: None,
                name: None,
                caller,
                reason: reason.clone(),
                expires_ms: None,
            }]);
            return Err(Status::invalid_argument(reason));
        }
        // Parse everything first, then hand the engine every valid request at once, so that
        // they are committed as one group.
        let mut responses = Vec::with_capacity(reqs.len());
        let mut cmds = Vec::with_capacity(reqs.len());
        for r in reqs {
            responses.push(match self.parse_authorize(r, &caller) {
                Ok(cmd) => {
                    cmds.push(cmd);
                    None
                }
                Err(e) => Some(pb::AuthorizeOne {
                    results: Vec::new(),
                    error: e.to_string(),
                }),
            });
        }
        let mut results = self
            .engine
            .authorize_many(cmds, caller)
            .await
            .map_err(engine_status)?
            .into_iter();
        let responses = responses
            .into_iter()
            .map(|one| {
                one.unwrap_or_else(|| pb::AuthorizeOne {
                    results: results.next().unwrap_or_default(),
                    error: String::new(),
                })
            })
            .collect();
        Ok(Response::new(pb::AuthorizeManyResponse { responses }))
    }

    async fn allow(
        &self,
        req: Request<pb::AllowRequest>,
    ) -> Result<Response<pb::AllowResponse>, Status> {
        let caller = self.require(&req, Role::Admin, "Allow")?;
        let r = req.into_inner();
        let net = parse_cidr(&r.cidr)?;
        let ttl = (r.ttl_s > 0).then(|| Duration::from_secs(r.ttl_s));
        if ttl.is_some_and(|t| t > Duration::from_secs(10 * 365 * 86_400)) {
            return Err(Status::invalid_argument(
                "ttl longer than 10 years; omit it for a permanent allowance",
            ));
        }
        let allowed = self
            .engine
            .allow(net, ttl, command::sanitize(&r.comment, 256), caller)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::AllowResponse {
            cidr: net.to_string(),
            expires_unix_ms: allowed.expires_ms.unwrap_or(0),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.require(&req, Role::Admin, "Revoke")?;
        let r = req.into_inner();
        let net = parse_cidr(&r.cidr)?;
        let revoked = self
            .engine
            .revoke(net, command::sanitize(&r.comment, 256), caller)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::RevokeResponse { revoked }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.require(&req, Role::Reader, "List")?;
        let r = req.into_inner();
        let filter = ListFilter {
            within: opt_cidr(&r.cidr)?,
            name: command::normalize_name(&r.name),
            limit: r.limit,
        };
        let (rows, total) = self.read(move |rd| rd.list(&filter)).await?;
        let grants = rows
            .into_iter()
            .map(|g| pb::GrantEntry {
                ip: if g.key.net.prefix_len() == g.key.net.max_prefix_len() {
                    g.key.net.addr().to_string()
                } else {
                    g.key.net.to_string()
                },
                client: g.key.client.map(|c| c.to_string()).unwrap_or_default(),
                names: g.names,
                first_granted_unix_ms: g.first_ms,
                last_granted_unix_ms: g.last_ms,
                expires_unix_ms: g.expires_ms.unwrap_or(0),
                source: match g.source {
                    Source::Dns => pb::Source::Dns,
                    Source::Manual => pb::Source::Manual,
                } as i32,
                comment: g.comment,
            })
            .collect();
        Ok(Response::new(pb::ListResponse { grants, total }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.require(&req, Role::Reader, "History")?;
        let r = req.into_inner();
        let filter = HistoryFilter {
            within: opt_cidr(&r.ip)?,
            name: command::normalize_name(&r.name),
            since_ms: (r.since_s > 0)
                .then(|| now_ms().saturating_sub(r.since_s.saturating_mul(1000))),
            limit: r.limit,
        };
        let rows = self.read(move |rd| rd.history(&filter)).await?;
        let events = rows
            .into_iter()
            .map(|e| pb::Event {
                id: e.id,
                at_unix_ms: e.at_ms,
                kind: match e.kind {
                    EventKind::Granted => pb::EventKind::Granted,
                    EventKind::Extended => pb::EventKind::Extended,
                    EventKind::Revoked => pb::EventKind::Revoked,
                    EventKind::Expired => pb::EventKind::Expired,
                    EventKind::ManualAllow => pb::EventKind::ManualAllow,
                    EventKind::Rejected => pb::EventKind::Rejected,
                    EventKind::Denied => pb::EventKind::Denied,
                    EventKind::Renewed => pb::EventKind::Renewed,
                    EventKind::Started => pb::EventKind::Started,
                    EventKind::Named => pb::EventKind::Named,
                } as i32,
                ip: e.target.unwrap_or_default(),
                client: e.client.map(|c| c.to_string()).unwrap_or_default(),
                name: e.name.unwrap_or_default(),
                uid: e.caller.uid.map_or(-1, i64::from),
                pid: e.caller.pid.map_or(-1, i64::from),
                reason: e.reason,
                expires_unix_ms: e.expires_ms.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::HistoryResponse { events }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.require(&req, Role::Reader, "Status")?;
        let settings = self.engine.settings();
        let table = settings.raw.table.clone();
        // Netlink, not `nft`: nft 1.0.6 would load every set element to list five counters.
        let counters = tokio::task::spawn_blocking(move || {
            crate::sys::Netlink::open().and_then(|mut nl| nl.counters(&table))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("reading counters: {e}")))?;
        let stats = self.read(|rd| rd.stats()).await?;
        let c = self.engine.counts();
        Ok(Response::new(pb::StatusResponse {
            api_version: guard_proto::API_VERSION.into(),
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            mode: match settings.raw.mode {
                Mode::Local => "local",
                Mode::Gateway => "gateway",
            }
            .into(),
            per_client: settings.raw.per_client,
            policy: settings.raw.policy.as_str().into(),
            grants_v4: c.v4,
            grants_v6: c.v6,
            manual: c.manual,
            counters: counters
                .into_iter()
                .map(|c| pb::Counter {
                    name: c.name,
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
            db_bytes: stats.db_bytes,
            uptime_s: self.started.elapsed().as_secs(),
            audit_events: stats.audit_events,
        }))
    }
}
