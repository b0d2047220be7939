//! Lifecycle, metrics and template verbs.

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use futures::StreamExt;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::TemplateName;

use super::{agent_error, capsule_id, AgentRpc};
use crate::agent::{CapsuleInfo, CreateRequest};
use crate::record::OnTimeout;
use crate::template::TemplateMeta;

pub(super) fn capsule_to_pb(c: CapsuleInfo) -> pb::Capsule {
    pb::Capsule {
        id: c.id.to_string(),
        template: c.template.to_string(),
        state: c.state.as_str().to_owned(),
        memory_kept: c.memory_kept,
        error: c.error.unwrap_or_default(),
        vcpus: c.vcpus,
        memory_mb: c.memory_mb,
        timeout_sec: c.timeout_sec,
        internet: c.internet,
        ip: c.ip.map(|i| i.to_string()).unwrap_or_default(),
        runtime: c.runtime,
        created_at_ms: c.created_at as i64,
        last_active_at_ms: c.last_active_at as i64,
        metadata: c.metadata.into_iter().collect(),
        engine: c.engine.to_string(),
        ..Default::default()
    }
}

fn capsule_reply(r: Result<CapsuleInfo, crate::error::AgentError>) -> ServiceResult<pb::Capsule> {
    Response::ok(capsule_to_pb(r.map_err(agent_error)?))
}

fn template_to_pb(t: TemplateMeta) -> pb::Template {
    pb::Template {
        name: t.name.to_string(),
        layers: t.layers.iter().map(|l| l.to_string()).collect(),
        size_bytes: t.size_bytes,
        created_at: t.created_at as i64,
        default_user: t.default_user.unwrap_or_default(),
        ..Default::default()
    }
}

fn template_name(s: &str) -> Result<TemplateName, ConnectError> {
    s.parse()
        .map_err(|e: wrenn_types::ids::InvalidId| ConnectError::invalid_argument(e.to_string()))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl pb::Agent for AgentRpc {
    async fn create_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateCapsuleRequest>,
    ) -> ServiceResult<pb::Capsule> {
        let r = request.to_owned_message();
        let mut req = CreateRequest::new(capsule_id(&r.id)?, template_name(&r.template)?);
        if r.vcpus > 0 {
            req.vcpus = r.vcpus;
        }
        if r.memory_mb > 0 {
            req.memory_mb = r.memory_mb;
        }
        req.timeout_sec = r.timeout_sec;
        req.on_timeout = if r.destroy_on_timeout {
            OnTimeout::Destroy
        } else {
            OnTimeout::Pause
        };
        req.internet = !r.no_internet;
        req.env = r.env.into_iter().collect();
        req.default_user = non_empty(r.default_user);
        req.metadata = r.metadata.into_iter().collect();
        req.access_token = non_empty(r.access_token);
        req.pids_limit = (r.pids_limit > 0).then_some(r.pids_limit);
        if !r.engine.is_empty() {
            req.engine = Some(r.engine.parse().map_err(ConnectError::invalid_argument)?);
        }
        let info = self.agent.create(req).await.map_err(agent_error)?;
        Response::ok(capsule_to_pb(info))
    }

    async fn destroy_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Empty> {
        let id = capsule_id(&request.to_owned_message().id)?;
        self.agent.destroy(&id).await.map_err(agent_error)?;
        Response::ok(pb::Empty::default())
    }

    async fn get_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Capsule> {
        let id = capsule_id(&request.to_owned_message().id)?;
        Response::ok(capsule_to_pb(self.agent.info_of(&id).map_err(agent_error)?))
    }

    async fn list_capsules(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListCapsulesRequest>,
    ) -> ServiceResult<pb::ListCapsulesResponse> {
        Response::ok(pb::ListCapsulesResponse {
            capsules: self.agent.list().into_iter().map(capsule_to_pb).collect(),
            auto_paused_ids: self
                .agent
                .take_auto_paused()
                .into_iter()
                .map(String::from)
                .collect(),
            ..Default::default()
        })
    }

    async fn pause_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Capsule> {
        let id = capsule_id(&request.to_owned_message().id)?;
        capsule_reply(self.agent.pause(&id).await)
    }

    async fn resume_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Capsule> {
        let id = capsule_id(&request.to_owned_message().id)?;
        capsule_reply(self.agent.resume(&id).await)
    }

    async fn hibernate_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Capsule> {
        let id = capsule_id(&request.to_owned_message().id)?;
        capsule_reply(self.agent.hibernate(&id).await)
    }

    async fn ping_capsule(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PingRequest>,
    ) -> ServiceResult<pb::Capsule> {
        let r = request.to_owned_message();
        let id = capsule_id(&r.id)?;
        Response::ok(capsule_to_pb(
            self.agent.ping(&id, r.timeout_sec).map_err(agent_error)?,
        ))
    }

    async fn set_internet(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SetInternetRequest>,
    ) -> ServiceResult<pb::Capsule> {
        let r = request.to_owned_message();
        let id = capsule_id(&r.id)?;
        self.agent
            .set_internet(&id, r.enabled)
            .await
            .map_err(agent_error)?;
        Response::ok(capsule_to_pb(self.agent.info_of(&id).map_err(agent_error)?))
    }

    async fn get_metrics(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::Metrics> {
        let id = capsule_id(&request.to_owned_message().id)?;
        let m = self.agent.metrics(&id).await.map_err(agent_error)?;
        let [fine, mid, coarse] = self.agent.samples(&id).map_err(agent_error)?;
        let points = |v: Vec<crate::agent::CapsuleMetrics>| -> Vec<pb::MetricPoint> {
            v.into_iter()
                .map(|p| pb::MetricPoint {
                    at_ms: p.at_ms as i64,
                    cpu_usec: p.usage.cpu_usec,
                    memory_bytes: p.usage.memory_bytes,
                    disk_bytes: p.disk_bytes,
                    pids: p.usage.pids,
                    ..Default::default()
                })
                .collect()
        };
        Response::ok(pb::Metrics {
            history: points(fine),
            history_2h: points(mid),
            history_24h: points(coarse),
            at_ms: m.at_ms as i64,
            cpu_usec: m.usage.cpu_usec,
            memory_bytes: m.usage.memory_bytes,
            disk_bytes: m.disk_bytes,
            pids: m.usage.pids,
            oom_kills: m.usage.oom_kills,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ExecRequest>,
    ) -> ServiceResult<pb::ExecResponse> {
        self.do_exec(ctx, request.to_owned_message()).await
    }

    async fn exec_stream(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ExecRequest>,
    ) -> ServiceResult<connectrpc::ServiceStream<pb::ProcessEvent>> {
        self.do_exec_stream(request.to_owned_message()).await
    }

    async fn start_background(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ExecRequest>,
    ) -> ServiceResult<pb::ProcessStarted> {
        self.do_start_background(request.to_owned_message()).await
    }

    async fn list_processes(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CapsuleRef>,
    ) -> ServiceResult<pb::ListProcessesResponse> {
        self.do_list_processes(request.to_owned_message()).await
    }

    async fn kill_process(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::KillProcessRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_kill_process(request.to_owned_message()).await
    }

    async fn connect_process(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ProcessRef>,
    ) -> ServiceResult<connectrpc::ServiceStream<pb::ProcessEvent>> {
        self.do_connect_process(request.to_owned_message()).await
    }

    async fn send_stdin(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::StdinRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_send_stdin(request.to_owned_message()).await
    }

    async fn pty_attach(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PtyAttachRequest>,
    ) -> ServiceResult<connectrpc::ServiceStream<pb::ProcessEvent>> {
        self.do_pty_attach(request.to_owned_message()).await
    }

    async fn pty_input(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PtyInputRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_pty_input(request.to_owned_message()).await
    }

    async fn pty_resize(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PtyResizeRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_pty_resize(request.to_owned_message()).await
    }

    async fn pty_kill(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PtyRef>,
    ) -> ServiceResult<pb::Empty> {
        self.do_pty_kill(request.to_owned_message()).await
    }

    async fn write_file(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::WriteFileRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_write_file(request.to_owned_message()).await
    }

    async fn read_file(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PathRequest>,
    ) -> ServiceResult<pb::ReadFileResponse> {
        self.do_read_file(request.to_owned_message()).await
    }

    async fn write_file_stream(
        &self,
        _ctx: RequestContext,
        requests: connectrpc::InboundStream<pb::WriteFileStreamRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_write_file_stream(requests).await
    }

    async fn read_file_stream(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PathRequest>,
    ) -> ServiceResult<connectrpc::ServiceStream<pb::FileChunk>> {
        self.do_read_file_stream(request.to_owned_message()).await
    }

    async fn list_dir(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PathRequest>,
    ) -> ServiceResult<pb::ListDirResponse> {
        self.do_list_dir(request.to_owned_message()).await
    }

    async fn make_dir(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PathRequest>,
    ) -> ServiceResult<pb::MakeDirResponse> {
        self.do_make_dir(request.to_owned_message()).await
    }

    async fn remove_path(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PathRequest>,
    ) -> ServiceResult<pb::Empty> {
        self.do_remove_path(request.to_owned_message()).await
    }

    async fn create_snapshot(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SnapshotRequest>,
    ) -> ServiceResult<pb::Template> {
        let r = request.to_owned_message();
        let id = capsule_id(&r.id)?;
        let name = template_name(&r.name)?;
        let overrides = crate::agent::SnapshotOverrides {
            start_cmd: r.start_cmd.clone(),
            ready_cmd: r.ready_cmd.clone(),
            env: r.env.clone().into_iter().collect(),
            default_user: r.default_user.clone(),
        };
        Response::ok(template_to_pb(
            self.agent
                .snapshot(&id, name, overrides)
                .await
                .map_err(agent_error)?,
        ))
    }

    async fn list_templates(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::Empty>,
    ) -> ServiceResult<pb::ListTemplatesResponse> {
        Response::ok(pb::ListTemplatesResponse {
            templates: self
                .agent
                .templates()
                .list()
                .into_iter()
                .map(template_to_pb)
                .collect(),
            ..Default::default()
        })
    }

    async fn delete_template(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::TemplateRef>,
    ) -> ServiceResult<pb::Empty> {
        let name = template_name(&request.to_owned_message().name)?;
        self.agent
            .delete_template(&name)
            .await
            .map_err(agent_error)?;
        Response::ok(pb::Empty::default())
    }

    async fn export_template(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::TemplateRef>,
    ) -> ServiceResult<connectrpc::ServiceStream<pb::FileChunk>> {
        let name = template_name(&request.to_owned_message().name)?;
        let stream = crate::template::export(self.agent.templates(), &name)
            .map_err(|e| agent_error(e.into()))?;
        let chunks = stream.map(|piece| {
            piece
                .map(|data| pb::FileChunk {
                    data: data.to_vec(),
                    ..Default::default()
                })
                .map_err(|e| agent_error(e.into()))
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn import_template(
        &self,
        _ctx: RequestContext,
        mut requests: connectrpc::InboundStream<pb::ImportTemplateRequest>,
    ) -> ServiceResult<pb::Template> {
        let failed = |e: crate::template::TemplateError| agent_error(e.into());
        let mut msg = match requests.next().await {
            Some(m) => m?.to_owned_message(),
            None => {
                return Err(ConnectError::invalid_argument(
                    "the stream carried no message",
                ))
            }
        };
        let name = template_name(&msg.name)?;
        let store = self.agent.templates();
        let mut import = crate::template::Import::start(store, &name).map_err(failed)?;
        // (any way out before `end` drops the import, which leaves nothing)
        loop {
            if !msg.data.is_empty() {
                import.write(&msg.data).await.map_err(failed)?;
            }
            if msg.end {
                break;
            }
            msg = match requests.next().await {
                Some(m) => m?.to_owned_message(),
                None => {
                    return Err(ConnectError::canceled(
                        "the import ended before its end message: nothing was kept",
                    ))
                }
            };
        }
        let meta = import.finish(store).await.map_err(failed)?;
        tracing::info!(template = %name, bytes = meta.size_bytes, "imported a template");
        Response::ok(template_to_pb(meta))
    }
}
