//! Files: multipart and streaming upload, download, and the filesystem RPCs.

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use wrenn_proto::filesystem as pb;

use crate::{ClientError, EnvdClient};

/// A file's contents as they arrive.
pub type FileStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, ClientError>> + Send>>;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Unknown,
    File,
    Dir,
    Symlink,
}

/// One filesystem entry as envd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub path: String,
    pub kind: FileKind,
    pub size: i64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// Unix seconds.
    pub modified: i64,
    pub symlink_target: Option<String>,
}

impl From<pb::EntryInfo> for Entry {
    fn from(e: pb::EntryInfo) -> Self {
        let kind = match e.r#type.as_known() {
            Some(pb::FileType::FILE_TYPE_FILE) => FileKind::File,
            Some(pb::FileType::FILE_TYPE_DIRECTORY) => FileKind::Dir,
            Some(pb::FileType::FILE_TYPE_SYMLINK) => FileKind::Symlink,
            _ => FileKind::Unknown,
        };
        Entry {
            name: e.name,
            path: e.path,
            kind: if e.is_symlink {
                FileKind::Symlink
            } else {
                kind
            },
            size: e.size,
            mode: e.mode,
            permissions: e.permissions,
            owner: e.owner,
            group: e.group,
            modified: e.modified_time.as_option().map_or(0, |t| t.seconds),
            symlink_target: e.symlink_target,
        }
    }
}

pub(crate) fn empty() -> wrenn_http::ClientBody {
    full(Bytes::new())
}

pub(crate) fn full(b: Bytes) -> wrenn_http::ClientBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

pub(crate) async fn collect(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::transport)?
        .to_bytes())
}

fn query_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn entry(field: Option<pb::EntryInfo>) -> Result<Entry, ClientError> {
    field
        .map(Entry::from)
        .ok_or_else(|| ClientError::Decode("no entry in the answer".into()))
}

impl EnvdClient {
    /// Write `data` to `path` (one multipart part, as SDKs do).
    pub async fn write_file(&self, path: &str, data: Bytes) -> Result<(), ClientError> {
        let mut raw = [0u8; 12];
        let _ = getrandom::fill(&mut raw);
        let boundary: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let filename = path.replace('"', "%22").replace(['\r', '\n'], "");
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let parts = futures::stream::iter([Bytes::from(head), data, Bytes::from(tail)])
            .map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)));
        let req = self
            .request(
                http::Method::POST,
                &format!("/files?path={}", query_path(path)),
            )
            .header(
                http::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(BodyExt::boxed(StreamBody::new(parts)))
            .map_err(ClientError::request)?;
        self.send(req).await.map(drop)
    }

    /// Stream a body of any size to `path` (raw octet-stream upload).
    pub async fn write_file_stream<S>(&self, path: &str, body: S) -> Result<(), ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let frames = body.map_ok(hyper::body::Frame::data);
        let req = self
            .request(
                http::Method::POST,
                &format!("/files?path={}", query_path(path)),
            )
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .map_err(ClientError::request)?;
        self.send(req).await.map(drop)
    }

    /// Read a whole file.
    pub async fn read_file(&self, path: &str) -> Result<Bytes, ClientError> {
        let resp = self.download(path).await?;
        collect(resp).await
    }

    /// Stream a file.
    pub async fn read_file_stream(&self, path: &str) -> Result<FileStream, ClientError> {
        let resp = self.download(path).await?;
        Ok(Box::pin(
            http_body_util::BodyStream::new(resp.into_body()).filter_map(|frame| async move {
                match frame {
                    Ok(f) => f.into_data().ok().map(Ok),
                    Err(e) => Some(Err(ClientError::transport(e))),
                }
            }),
        ))
    }

    async fn download(
        &self,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let req = self.bodyless(
            http::Method::GET,
            &format!("/files?path={}", query_path(path)),
        )?;
        self.send(req).await
    }

    /// Describe a path.
    pub async fn stat(&self, path: &str) -> Result<Entry, ClientError> {
        let resp = self
            .fs
            .stat(pb::StatRequest {
                path: path.to_string(),
                ..Default::default()
            })
            .await?;
        entry(resp.into_view().to_owned_message().entry.into_option())
    }

    /// List a directory down to `depth` levels.
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<Entry>, ClientError> {
        let resp = self
            .fs
            .list_dir(pb::ListDirRequest {
                path: path.to_string(),
                depth,
                ..Default::default()
            })
            .await?;
        Ok(resp
            .into_view()
            .to_owned_message()
            .entries
            .into_iter()
            .map(Entry::from)
            .collect())
    }

    /// Create a directory and its parents. `Ok(false)` if it already existed.
    pub async fn make_dir(&self, path: &str) -> Result<bool, ClientError> {
        let res = self
            .fs
            .make_dir(pb::MakeDirRequest {
                path: path.to_string(),
                ..Default::default()
            })
            .await;
        crate::false_on(res, connectrpc::ErrorCode::AlreadyExists)
    }

    /// Remove a path recursively; a missing path is fine.
    pub async fn remove(&self, path: &str) -> Result<(), ClientError> {
        self.fs
            .remove(pb::RemoveRequest {
                path: path.to_string(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Rename `from` to `to`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<Entry, ClientError> {
        let resp = self
            .fs
            .r#move(pb::MoveRequest {
                source: from.to_string(),
                destination: to.to_string(),
                ..Default::default()
            })
            .await?;
        entry(resp.into_view().to_owned_message().entry.into_option())
    }
}
