//! Files: relays to the capsule's envd (`/files` and the Filesystem RPC).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use connectrpc::{ConnectError, InboundStream, Response, ServiceResult, ServiceStream};
use envd_client::{Entry, FileKind};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof as pb_oneof;

use super::{envd_error, AgentRpc};

/// Chunks held between the RPC stream and the upload to envd: a slow envd
/// blocks the reader (back-pressure to the caller), nothing is dropped.
const UPLOAD_BUFFER: usize = 16;
/// Size of the messages of `ReadFileStream`.
const CHUNK: usize = 64 << 10;
/// Largest list depth accepted.
const MAX_DEPTH: u32 = 16;

fn path(p: &str) -> Result<&str, ConnectError> {
    if p.is_empty() {
        return Err(ConnectError::invalid_argument("path is required"));
    }
    if p.contains('\0') {
        return Err(ConnectError::invalid_argument("path contains a NUL byte"));
    }
    Ok(p)
}

fn entry_to_pb(e: Entry) -> pb::FileEntry {
    let kind = match e.kind {
        FileKind::File => "file",
        FileKind::Dir => "directory",
        FileKind::Symlink => "symlink",
        FileKind::Unknown => "unknown",
    };
    pb::FileEntry {
        name: e.name,
        path: e.path,
        r#type: kind.to_owned(),
        size: e.size.max(0) as u64,
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_ms: e.modified.saturating_mul(1000),
        symlink_target: e.symlink_target.unwrap_or_default(),
        ..Default::default()
    }
}

/// An upload body fed by a channel (`Sync`, as envd-client's upload needs).
/// What the pump hands envd's upload: a chunk, or the end.
enum Piece {
    Chunk(Bytes),
    End,
}

/// An upload's body for envd. It ends only after [`Piece::End`]: its
/// channel closed without one (the caller went away, an error) is an
/// error, so the request to envd breaks and envd discards the partial
/// file. (A clean end there would commit it.)
struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    ended: bool,
}

impl Stream for ChannelBody {
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Piece::Chunk(b)) => Poll::Ready(Some(Ok(b))),
            Some(Piece::End) => {
                self.ended = true;
                Poll::Ready(None)
            }
            None => {
                self.ended = true;
                Poll::Ready(Some(Err(std::io::Error::other("the upload was cut short"))))
            }
        }
    }
}

impl AgentRpc {
    pub(super) async fn do_write_file(&self, r: pb::WriteFileRequest) -> ServiceResult<pb::Empty> {
        let c = self.running(&r.id)?;
        c.envd()
            .write_file(path(&r.path)?, Bytes::from(r.content))
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_read_file(
        &self,
        r: pb::PathRequest,
    ) -> ServiceResult<pb::ReadFileResponse> {
        let c = self.running(&r.id)?;
        let data = c
            .envd()
            .read_file(path(&r.path)?)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::ReadFileResponse {
            content: data.to_vec(),
            ..Default::default()
        })
    }

    pub(super) async fn do_write_file_stream(
        &self,
        mut requests: InboundStream<pb::WriteFileStreamRequest>,
    ) -> ServiceResult<pb::Empty> {
        use pb_oneof::write_file_stream_request::Msg;
        let first = match requests.next().await {
            Some(m) => m?.to_owned_message(),
            None => {
                return Err(ConnectError::invalid_argument(
                    "the stream carried no meta message",
                ))
            }
        };
        let Some(Msg::Meta(meta)) = first.msg else {
            return Err(ConnectError::invalid_argument(
                "the first message must be meta {id, path}",
            ));
        };
        let c = self.running(&meta.id)?;
        let target = path(&meta.path)?.to_owned();
        let (tx, rx) = mpsc::channel(UPLOAD_BUFFER);
        // Read the caller's chunks while envd consumes them; both in this
        // task. Any way out but `end` drops `tx` without Piece::End, which
        // breaks envd's request (see ChannelBody).
        let pump = async move {
            while let Some(m) = requests.next().await {
                match m.map(|m| m.to_owned_message().msg) {
                    Ok(Some(Msg::Chunk(data))) => {
                        if tx.send(Piece::Chunk(Bytes::from(data))).await.is_err() {
                            return Ok(()); // envd's side failed: its error wins
                        }
                    }
                    Ok(Some(Msg::End(_))) => {
                        let _ = tx.send(Piece::End).await;
                        return Ok(());
                    }
                    Ok(Some(Msg::Meta(_))) => {
                        return Err(ConnectError::invalid_argument("a second meta message"))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(ConnectError::canceled(
                "the upload ended before its end message: the partial file is discarded",
            ))
        };
        let envd = c.envd();
        let upload = envd.write_file_stream(&target, ChannelBody { rx, ended: false });
        let (pumped, uploaded) = tokio::join!(pump, upload);
        pumped?;
        uploaded.map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_read_file_stream(
        &self,
        r: pb::PathRequest,
    ) -> ServiceResult<ServiceStream<pb::FileChunk>> {
        let c = self.running(&r.id)?;
        let stream = c
            .envd()
            .read_file_stream(path(&r.path)?)
            .await
            .map_err(|e| envd_error(&c, e))?;
        // Re-cut whatever envd's body yields into messages of at most 64 KiB.
        let chunks = stream.flat_map({
            let c = c.clone();
            move |chunk| {
                let items: Vec<Result<pb::FileChunk, ConnectError>> = match chunk {
                    Ok(data) => data
                        .chunks(CHUNK)
                        .map(|piece| {
                            Ok(pb::FileChunk {
                                data: piece.to_vec(),
                                ..Default::default()
                            })
                        })
                        .collect(),
                    Err(e) => vec![Err(envd_error(&c, e))],
                };
                futures::stream::iter(items)
            }
        });
        Ok(Response::new(Box::pin(super::until_paused(chunks, &c))))
    }

    pub(super) async fn do_list_dir(
        &self,
        r: pb::PathRequest,
    ) -> ServiceResult<pb::ListDirResponse> {
        let c = self.running(&r.id)?;
        let depth = r.depth.clamp(1, MAX_DEPTH);
        let entries = c
            .envd()
            .list_dir(path(&r.path)?, depth)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::ListDirResponse {
            entries: entries.into_iter().map(entry_to_pb).collect(),
            ..Default::default()
        })
    }

    pub(super) async fn do_make_dir(
        &self,
        r: pb::PathRequest,
    ) -> ServiceResult<pb::MakeDirResponse> {
        let c = self.running(&r.id)?;
        let created = c
            .envd()
            .make_dir(path(&r.path)?)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::MakeDirResponse {
            created,
            ..Default::default()
        })
    }

    pub(super) async fn do_remove_path(&self, r: pb::PathRequest) -> ServiceResult<pb::Empty> {
        let c = self.running(&r.id)?;
        let p = path(&r.path)?;
        // envd removes a missing path silently; callers of the agent are
        // told it was not there (wrenn's SDK documents not_found).
        c.envd().stat(p).await.map_err(|e| envd_error(&c, e))?;
        c.envd().remove(p).await.map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }
}
