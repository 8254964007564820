//! The `guard.v1.Resolver` gRPC service on dnsd's Unix socket, with SO_PEERCRED roles: readers may call Stats and Upstreams, admins also FlushCache.

use std::sync::Arc;
use std::time::Instant;

use guard_proto::v1::resolver_server::{Resolver, ResolverServer};
use guard_proto::v1::{
    FlushCacheRequest, FlushCacheResponse, StatsRequest, StatsResponse, UpstreamsRequest,
    UpstreamsResponse,
};
use hickory_proto::rr::Name;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::config::ControlConfig;
use crate::handler::Handler;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Stats and Upstreams.
    Reader,
    /// Everything, including FlushCache.
    Admin,
}

/// Who gets which role.
#[derive(Debug, Clone)]
pub struct Roles {
    admin_uids: Vec<u32>,
    admin_gids: Vec<u32>,
    reader_gids: Vec<u32>,
    own_uid: u32,
    socket_gid: Option<u32>,
}

impl Roles {
    /// Roles from config; `socket_gid` is the control socket's group, whose members are readers.
    pub fn new(cfg: &ControlConfig, socket_gid: Option<u32>) -> Self {
        Roles {
            admin_uids: cfg.admin_uids.clone(),
            admin_gids: cfg.admin_gids.clone(),
            reader_gids: cfg.reader_gids.clone(),
            own_uid: nix::unistd::geteuid().as_raw(),
            socket_gid,
        }
    }

    /// The role of a peer, or `None` for no access at all.
    pub fn of(&self, uid: u32, gid: u32) -> Option<Role> {
        if self.admin_uids.contains(&uid) || self.admin_gids.contains(&gid) {
            Some(Role::Admin)
        } else if uid == self.own_uid
            || self.reader_gids.contains(&gid)
            || self.socket_gid == Some(gid)
        {
            Some(Role::Reader)
        } else {
            None
        }
    }
}

/// The Resolver service.
#[derive(Debug)]
pub struct Control {
    handler: Arc<Handler>,
    roles: Roles,
    started: Instant,
}

impl Control {
    /// A service over `handler`'s cache, metrics and upstreams.
    pub fn new(handler: Arc<Handler>, roles: Roles) -> Self {
        Control {
            handler,
            roles,
            started: Instant::now(),
        }
    }

    /// Checks the caller's SO_PEERCRED against the role `need`; rejects hard without creds.
    fn check<T>(&self, req: &Request<T>, rpc: &'static str, need: Role) -> Result<(), Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        let Some(cred) = cred else {
            tracing::warn!(rpc, "control call without peer credentials denied");
            return Err(Status::permission_denied("no peer credentials"));
        };
        match self.roles.of(cred.uid(), cred.gid()) {
            Some(role) if role >= need => Ok(()),
            _ => {
                tracing::warn!(
                    rpc,
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = cred.pid(),
                    "control call denied"
                );
                Err(Status::permission_denied(format!(
                    "{rpc} needs the {need:?} role"
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl Resolver for Control {
    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        self.check(&req, "Stats", Role::Reader)?;
        let s = self.handler.metrics().snapshot();
        Ok(Response::new(StatsResponse {
            api_version: guard_proto::API_VERSION.to_owned(),
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            queries: s.queries,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            cache_entries: self.handler.cache().len() as u64,
            servfail: s.servfail,
            refused: s.refused,
            authorize_calls: s.authorize_calls,
            authorize_failures: s.authorize_failures,
            in_flight: s.in_flight,
        }))
    }

    async fn flush_cache(
        &self,
        req: Request<FlushCacheRequest>,
    ) -> Result<Response<FlushCacheResponse>, Status> {
        self.check(&req, "FlushCache", Role::Admin)?;
        let name = req.into_inner().name;
        let flushed = if name.is_empty() {
            self.handler.cache().flush(None)
        } else {
            if name.len() > 254 {
                return Err(Status::invalid_argument("name longer than 254 characters"));
            }
            let zone = Name::from_ascii(&name)
                .map_err(|e| Status::invalid_argument(format!("invalid name: {e}")))?;
            self.handler.cache().flush(Some(&zone))
        };
        tracing::info!(flushed, "cache flushed");
        Ok(Response::new(FlushCacheResponse { flushed }))
    }

    async fn upstreams(
        &self,
        req: Request<UpstreamsRequest>,
    ) -> Result<Response<UpstreamsResponse>, Status> {
        self.check(&req, "Upstreams", Role::Reader)?;
        let live = self.handler.live();
        Ok(Response::new(UpstreamsResponse {
            strategy: live.upstreams.strategy(),
            upstreams: live.upstreams.health(),
        }))
    }
}

/// Serves the Resolver service on `listener` until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    control: Control,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(ResolverServer::new(control))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn role_mapping() {
        let cfg = ControlConfig {
            admin_uids: vec![0],
            admin_gids: vec![50],
            reader_gids: vec![60],
            ..ControlConfig::default()
        };
        let r = Roles {
            own_uid: 999,
            ..Roles::new(&cfg, Some(70))
        };
        assert_eq!(r.of(0, 1), Some(Role::Admin));
        assert_eq!(r.of(1000, 50), Some(Role::Admin));
        assert_eq!(r.of(1000, 60), Some(Role::Reader));
        assert_eq!(r.of(1000, 70), Some(Role::Reader));
        assert_eq!(r.of(999, 1), Some(Role::Reader));
        assert_eq!(r.of(1000, 1000), None);
        assert!(Role::Admin > Role::Reader);
    }
}
