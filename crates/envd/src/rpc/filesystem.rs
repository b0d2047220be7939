//! `filesystem.Filesystem` over [`crate::fs`]. Blocking filesystem work runs
//! on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use buffa::MessageField;
use connectrpc::{
    ConnectError, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream,
};
use tokio::sync::mpsc;
use wrenn_proto::filesystem as pb;
use wrenn_proto::filesystem::__buffa::oneof as pb_oneof;

use super::{entry_to_pb, fs_error, internal, keepalive_interval, rpc_user};
use crate::fs::watch::{self, EventKind, FsEvent, WatchError, WatchItem, WatchSpec};
use crate::fs::{self, FsError};
use crate::paths;
use crate::state::Envd;

/// The `filesystem.Filesystem` service.
pub struct FilesystemRpc {
    state: Arc<Envd>,
}

impl FilesystemRpc {
    pub fn new(state: Arc<Envd>) -> Self {
        Self { state }
    }

    /// The acting user and `raw` resolved against their home.
    fn resolve(
        &self,
        ctx: &RequestContext,
        raw: &str,
    ) -> Result<
        (
            crate::users::Accounts,
            crate::users::User,
            std::path::PathBuf,
        ),
        ConnectError,
    > {
        let (accounts, user) = rpc_user(&self.state, ctx)?;
        let path = paths::resolve(raw, &user.home);
        Ok((accounts, user, path))
    }

    fn watch_spec(
        &self,
        ctx: &RequestContext,
        path: &str,
        recursive: bool,
        include_entry: bool,
        allow_network_mounts: bool,
    ) -> Result<(WatchSpec, crate::users::Accounts), ConnectError> {
        let (accounts, _, root) = self.resolve(ctx, path)?;
        Ok((
            WatchSpec {
                root,
                recursive,
                include_entry,
                allow_network_mounts,
            },
            accounts,
        ))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal("filesystem task", e))?
        .map_err(fs_error)
}

fn watch_error(e: WatchError) -> ConnectError {
    match e {
        WatchError::Fs(f) => fs_error(f),
        WatchError::NetworkMount(_) => ConnectError::invalid_argument(e.to_string()),
        WatchError::UnknownWatcher(_) => ConnectError::not_found(e.to_string()),
        WatchError::TooMany => ConnectError::resource_exhausted(e.to_string()),
        WatchError::Inotify(_) => internal("watch", format!("{e:#}")),
        WatchError::Failed(m) => ConnectError::internal(m),
    }
}

fn event_to_pb(e: FsEvent) -> pb::FilesystemEvent {
    let kind = match e.kind {
        EventKind::Create => pb::EventType::EVENT_TYPE_CREATE,
        EventKind::Write => pb::EventType::EVENT_TYPE_WRITE,
        EventKind::Remove => pb::EventType::EVENT_TYPE_REMOVE,
        EventKind::Rename => pb::EventType::EVENT_TYPE_RENAME,
        EventKind::Chmod => pb::EventType::EVENT_TYPE_CHMOD,
    };
    pb::FilesystemEvent {
        name: e.name,
        r#type: kind.into(),
        entry: e.entry.map(entry_to_pb).into(),
        ..Default::default()
    }
}

fn watch_response(event: pb_oneof::watch_dir_response::Event) -> pb::WatchDirResponse {
    pb::WatchDirResponse {
        event: Some(event),
        ..Default::default()
    }
}

impl pb::Filesystem for FilesystemRpc {
    async fn stat(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::StatRequest>,
    ) -> ServiceResult<pb::StatResponse> {
        let (accounts, _, path) = self.resolve(&ctx, request.path)?;
        let entry = blocking(move || fs::entry_info(&path, &accounts)).await?;
        Response::ok(pb::StatResponse {
            entry: MessageField::some(entry_to_pb(entry)),
            ..Default::default()
        })
    }

    async fn make_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::MakeDirRequest>,
    ) -> ServiceResult<pb::MakeDirResponse> {
        let (accounts, user, path) = self.resolve(&ctx, request.path)?;
        let entry = blocking(move || fs::make_dir(&path, &user, &accounts)).await?;
        Response::ok(pb::MakeDirResponse {
            entry: MessageField::some(entry_to_pb(entry)),
            ..Default::default()
        })
    }

    async fn r#move(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::MoveRequest>,
    ) -> ServiceResult<pb::MoveResponse> {
        let (accounts, user, from) = self.resolve(&ctx, request.source)?;
        let to = paths::resolve(request.destination, &user.home);
        let entry = blocking(move || fs::move_path(&from, &to, &user, &accounts)).await?;
        Response::ok(pb::MoveResponse {
            entry: MessageField::some(entry_to_pb(entry)),
            ..Default::default()
        })
    }

    async fn list_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListDirRequest>,
    ) -> ServiceResult<pb::ListDirResponse> {
        let (accounts, _, path) = self.resolve(&ctx, request.path)?;
        let depth = request.depth;
        let entries = blocking(move || fs::list_dir(&path, depth, &accounts)).await?;
        Response::ok(pb::ListDirResponse {
            entries: entries.into_iter().map(entry_to_pb).collect(),
            ..Default::default()
        })
    }

    async fn remove(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::RemoveRequest>,
    ) -> ServiceResult<pb::RemoveResponse> {
        let (_, _, path) = self.resolve(&ctx, request.path)?;
        // (it would take envd and the capsule's mounts part way, then fail)
        if path == std::path::Path::new("/") {
            return Err(ConnectError::invalid_argument("refusing to remove /"));
        }
        blocking(move || fs::remove(&path)).await?;
        Response::ok(pb::RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::WatchDirRequest>,
    ) -> ServiceResult<ServiceStream<pb::WatchDirResponse>> {
        let (spec, accounts) = self.watch_spec(
            &ctx,
            request.path,
            request.recursive,
            request.include_entry,
            request.allow_network_mounts,
        )?;
        // Adding watches walks the tree: off the async workers.
        let (watch, rx) = tokio::task::spawn_blocking(move || watch::start(spec, accounts))
            .await
            .map_err(|e| internal("watch task", e))?
            .map_err(watch_error)?;
        Ok(Response::new(watch_stream(
            watch,
            rx,
            keepalive_interval(&ctx),
        )))
    }

    async fn create_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateWatcherRequest>,
    ) -> ServiceResult<pb::CreateWatcherResponse> {
        let (spec, accounts) = self.watch_spec(
            &ctx,
            request.path,
            request.recursive,
            request.include_entry,
            request.allow_network_mounts,
        )?;
        let state = self.state.clone();
        let id = tokio::task::spawn_blocking(move || state.watchers.create(spec, accounts))
            .await
            .map_err(|e| internal("watch task", e))?
            .map_err(watch_error)?;
        Response::ok(pb::CreateWatcherResponse {
            watcher_id: id,
            ..Default::default()
        })
    }

    async fn get_watcher_events(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetWatcherEventsRequest>,
    ) -> ServiceResult<pb::GetWatcherEventsResponse> {
        let events = self
            .state
            .watchers
            .drain(request.watcher_id)
            .map_err(watch_error)?;
        Response::ok(pb::GetWatcherEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
            ..Default::default()
        })
    }

    async fn remove_watcher(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::RemoveWatcherRequest>,
    ) -> ServiceResult<pb::RemoveWatcherResponse> {
        self.state
            .watchers
            .remove(request.watcher_id)
            .map_err(watch_error)?;
        Response::ok(pb::RemoveWatcherResponse::default())
    }
}

struct WatchState {
    _watch: watch::Watch,
    rx: mpsc::Receiver<WatchItem>,
    keepalive: tokio::time::Interval,
    started: bool,
    done: bool,
}

/// `start{}` first, then events, with keepalives after `keepalive` of silence.
fn watch_stream(
    watch: watch::Watch,
    rx: mpsc::Receiver<WatchItem>,
    keepalive: Duration,
) -> ServiceStream<pb::WatchDirResponse> {
    use pb_oneof::watch_dir_response::Event as E;
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = WatchState {
        _watch: watch,
        rx,
        keepalive: interval,
        started: false,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        if !s.started {
            s.started = true;
            return Some((Ok(watch_response(E::Start(Box::default()))), s));
        }
        if s.done {
            return None;
        }
        let item = tokio::select! {
            biased;
            ev = s.rx.recv() => match ev? {
                Ok(ev) => {
                    s.keepalive.reset();
                    Ok(watch_response(E::Filesystem(Box::new(event_to_pb(ev)))))
                }
                Err(failure) => {
                    s.done = true;
                    Err(ConnectError::internal(failure))
                }
            },
            _ = s.keepalive.tick() => Ok(watch_response(E::Keepalive(Box::default()))),
        };
        Some((item, s))
    }))
}
