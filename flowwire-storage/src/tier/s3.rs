//! The S3 tier: blobs as objects in a bucket, on `aws-sdk-s3`.
//!
//! * Blobs up to `part_size` go up in one `PutObject`; larger ones in a multipart upload
//!   whose parts are slices of the caller's buffers (no copy of the body), at most four in
//!   flight; a failed upload is aborted so no parts linger.
//! * Reads stream the object into one buffer sized by the length the caller expects (no
//!   growth copies, so a 256 MB state needs 256 MB, not 512), and stop one byte past it.
//! * Retries with exponential backoff and per-attempt timeouts are the SDK's standard
//!   retry strategy, configured here; what is left after them is [`TierError::Unavailable`]
//!   (the engine retries later) or [`TierError::Rejected`] (fix the configuration).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::{BlobTier, TierError, check_key, concat};
use crate::join::BoxFuture;

/// Smallest part S3 accepts in a multipart upload (except the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Where and how to reach a bucket.
///
/// ```
/// use flowwire::storage::tier::S3Config;
/// // Real AWS, credentials from the standard chain (environment, profile, instance role):
/// let aws = S3Config::new("my-bucket").region("eu-west-1").prefix("flowwire");
/// // An S3-compatible server on loopback:
/// let local = S3Config::new("test")
///     .endpoint("http://127.0.0.1:9000")
///     .path_style(true)
///     .credentials("access-key", "secret-key");
/// # let _ = (aws, local);
/// ```
#[derive(Debug, Clone)]
pub struct S3Config {
    bucket: String,
    prefix: String,
    region: String,
    endpoint: Option<String>,
    path_style: bool,
    credentials: Option<(String, String)>,
    part_size: usize,
    max_attempts: u32,
    attempt_timeout: Duration,
}

impl S3Config {
    /// A bucket in `us-east-1`, credentials from the standard AWS chain, 8 MiB parts,
    /// 5 attempts per request, 60 s per attempt.
    pub fn new(bucket: &str) -> Self {
        Self {
            bucket: bucket.to_string(),
            prefix: String::new(),
            region: "us-east-1".to_string(),
            endpoint: None,
            path_style: false,
            credentials: None,
            part_size: 8 << 20,
            max_attempts: 5,
            attempt_timeout: Duration::from_mins(1),
        }
    }

    /// A key prefix (a "folder") for every blob.
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.trim_matches('/').to_string();
        self
    }

    /// The region.
    #[must_use]
    pub fn region(mut self, region: &str) -> Self {
        self.region = region.to_string();
        self
    }

    /// The endpoint of an S3-compatible server (`http://127.0.0.1:9000`).
    #[must_use]
    pub fn endpoint(mut self, url: &str) -> Self {
        self.endpoint = Some(url.to_string());
        self
    }

    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[must_use]
    pub fn path_style(mut self, on: bool) -> Self {
        self.path_style = on;
        self
    }

    /// Explicit static credentials instead of the standard chain.
    #[must_use]
    pub fn credentials(mut self, access_key: &str, secret_key: &str) -> Self {
        self.credentials = Some((access_key.to_string(), secret_key.to_string()));
        self
    }

    /// The multipart part size (at least 5 MiB; smaller values are raised to it).
    #[must_use]
    pub fn part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    /// Attempts per request (1 = no retry), with exponential backoff between them.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Time allowed for one attempt of one request.
    #[must_use]
    pub fn attempt_timeout(mut self, t: Duration) -> Self {
        self.attempt_timeout = t;
        self
    }
}

/// Blobs as objects in an S3 bucket; the client is built on first use.
#[derive(Clone)]
pub struct S3Tier {
    config: Arc<S3Config>,
    client: Arc<OnceCell<Client>>,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("bucket", &self.config.bucket)
            .field("prefix", &self.config.prefix)
            .field("endpoint", &self.config.endpoint)
            .finish_non_exhaustive()
    }
}

fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, HttpResponse>,
) -> TierError {
    let detail = match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("unknown error"),
                err.message().unwrap_or("no message")
            )
        }
        other => format!("{other}"),
    };
    match e {
        SdkError::ConstructionFailure(_) => TierError::rejected("s3", detail),
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let transient = matches!(
                code,
                "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"
            ) || s.raw().status().is_server_error()
                || s.raw().status().as_u16() == 429;
            if transient {
                TierError::unavailable("s3", detail)
            } else {
                TierError::rejected("s3", detail)
            }
        }
        _ => TierError::unavailable("s3", detail),
    }
}

impl S3Tier {
    /// A tier on the configured bucket.
    pub fn new(config: S3Config) -> Self {
        Self {
            config: Arc::new(config),
            client: Arc::new(OnceCell::new()),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let c = &self.config;
                let mut b = match &c.credentials {
                    Some((ak, sk)) => aws_sdk_s3::config::Builder::new()
                        .behavior_version(BehaviorVersion::latest())
                        .credentials_provider(Credentials::new(ak, sk, None, None, "flowwire")),
                    None => {
                        let shared = aws_config::defaults(BehaviorVersion::latest())
                            .region(Region::new(c.region.clone()))
                            .load()
                            .await;
                        aws_sdk_s3::config::Builder::from(&shared)
                    }
                };
                b = b
                    .region(Region::new(c.region.clone()))
                    .force_path_style(c.path_style)
                    .retry_config(
                        RetryConfig::standard()
                            .with_max_attempts(c.max_attempts)
                            .with_initial_backoff(Duration::from_millis(50))
                            .with_max_backoff(Duration::from_secs(2)),
                    )
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_attempt_timeout(c.attempt_timeout)
                            .build(),
                    );
                if let Some(url) = &c.endpoint {
                    b = b.endpoint_url(url);
                }
                Client::from_conf(b.build())
            })
            .await
    }

    fn object_key(&self, key: &str) -> Result<String, TierError> {
        check_key(key)?;
        Ok(if self.config.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.config.prefix)
        })
    }

    /// Reads the object under `key`, or the bytes `first..=last` of it, keeping at most
    /// `cap` bytes whatever the server sends (and reserving no more than 64 MiB up front
    /// whatever it declares). `None` when there is no object; a range that starts past its
    /// end (416) reads as empty.
    async fn read(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        cap: u64,
    ) -> Result<Option<Bytes>, TierError> {
        let object = self.object_key(key)?;
        let got = self
            .client()
            .await
            .get_object()
            .bucket(&self.config.bucket)
            .key(&object)
            .set_range(range.map(|(first, last)| format!("bytes={first}-{last}")))
            .send()
            .await;
        let mut out = match got {
            Ok(out) => out,
            Err(e)
                if e.as_service_error().is_some_and(
                    aws_sdk_s3::operation::get_object::GetObjectError::is_no_such_key,
                ) =>
            {
                return Ok(None);
            }
            Err(e)
                if range.is_some()
                    && e.raw_response().is_some_and(|r| r.status().as_u16() == 416) =>
            {
                return Ok(Some(Bytes::new()));
            }
            Err(e) => return Err(sdk_error(&e)),
        };
        let declared = out
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        let reserve = declared.min(cap).min(64 << 20);
        let mut buf = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
        while let Some(chunk) = out.body.next().await {
            let chunk = chunk.map_err(|e| TierError::unavailable("s3", e))?;
            let room = usize::try_from(cap - buf.len() as u64).unwrap_or(usize::MAX);
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if buf.len() as u64 >= cap {
                break;
            }
        }
        Ok(Some(Bytes::from(buf)))
    }

    /// Creates the bucket if it does not exist (for tests and first-time setup; production
    /// buckets are usually created by infrastructure code).
    pub async fn create_bucket_if_missing(&self) -> Result<(), TierError> {
        let client = self.client().await;
        let bucket = &self.config.bucket;
        if client.head_bucket().bucket(bucket).send().await.is_ok() {
            return Ok(());
        }
        match client.create_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let code = e.as_service_error().and_then(ProvideErrorMetadata::code);
                if matches!(
                    code,
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) {
                    Ok(())
                } else {
                    Err(sdk_error(&e))
                }
            }
        }
    }

    async fn put_multipart(&self, key: &str, parts: &[Bytes]) -> Result<(), TierError> {
        let client = self.client().await.clone();
        let bucket = self.config.bucket.clone();
        let created = client
            .create_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error(&e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| TierError::unavailable("s3", "the server gave no upload id"))?
            .to_string();
        let uploaded = self
            .upload_parts(&client, &bucket, key, &upload_id, parts)
            .await;
        let completed = match uploaded {
            Ok(done) => client
                .complete_multipart_upload()
                .bucket(&bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error(&e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let _ = client
                .abort_multipart_upload()
                .bucket(&bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed
    }

    async fn upload_parts(
        &self,
        client: &Client,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[Bytes],
    ) -> Result<Vec<CompletedPart>, TierError> {
        const IN_FLIGHT: usize = 4;
        let chunks = split_parts(parts, self.config.part_size);
        let mut done: Vec<CompletedPart> = Vec::with_capacity(chunks.len());
        let mut running = tokio::task::JoinSet::new();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let number = i32::try_from(i + 1)
                .map_err(|_| TierError::rejected("s3", "more than 10,000 parts"))?;
            if running.len() >= IN_FLIGHT {
                done.push(join_part(&mut running).await?);
            }
            let req = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk));
            running.spawn(async move {
                let out = req.send().await.map_err(|e| sdk_error(&e))?;
                Ok(CompletedPart::builder()
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .part_number(number)
                    .build())
            });
        }
        while !running.is_empty() {
            done.push(join_part(&mut running).await?);
        }
        done.sort_by_key(CompletedPart::part_number);
        Ok(done)
    }
}

async fn join_part(
    running: &mut tokio::task::JoinSet<Result<CompletedPart, TierError>>,
) -> Result<CompletedPart, TierError> {
    match running.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(TierError::unavailable("s3", format!("upload task: {e}"))),
        None => Err(TierError::unavailable("s3", "no part in flight")),
    }
}

/// Cuts the concatenation of `parts` into chunks of `size` bytes (the last may be shorter).
/// A chunk inside one part is a slice of it (no copy); only chunks that straddle parts are
/// copied.
fn split_parts(parts: &[Bytes], size: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for p in parts {
        let mut at = 0;
        while at < p.len() {
            if pending.is_empty() && p.len() - at >= size {
                out.push(p.slice(at..at + size));
                at += size;
                continue;
            }
            let take = (size - pending.len()).min(p.len() - at);
            pending.extend_from_slice(&p[at..at + take]);
            at += take;
            if pending.len() == size {
                out.push(Bytes::from(std::mem::take(&mut pending)));
            }
        }
    }
    if !pending.is_empty() || out.is_empty() {
        out.push(Bytes::from(pending));
    }
    out
}

impl BlobTier for S3Tier {
    fn put<'a>(&'a self, key: &'a str, parts: &'a [Bytes]) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            let key = self.object_key(key)?;
            let total: usize = parts.iter().map(Bytes::len).sum();
            if total > self.config.part_size {
                return self.put_multipart(&key, parts).await;
            }
            self.client()
                .await
                .put_object()
                .bucket(&self.config.bucket)
                .key(&key)
                .body(ByteStream::from(concat(parts)))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error(&e))
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            // Read at most one byte past the expected length.
            let cap = expect.map_or(u64::MAX, |e| e.saturating_add(1));
            self.read(key, None, cap).await
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, TierError>> {
        Box::pin(async move {
            // An empty range asks for one byte: whether the object exists, without its body.
            let asked = len.max(1);
            let last = offset.saturating_add(asked - 1);
            self.read(key, Some((offset, last)), len).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), TierError>> {
        Box::pin(async move {
            let key = self.object_key(key)?;
            self.client()
                .await
                .delete_object()
                .bucket(&self.config.bucket)
                .key(&key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error(&e))
        })
    }

    fn is_shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_cut_at_the_part_size_without_losing_a_byte() {
        let a = Bytes::from(vec![1u8; 7]);
        let b = Bytes::from((0..25u8).collect::<Vec<_>>());
        let chunks = split_parts(&[a.clone(), b.clone()], 10);
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            [10, 10, 10, 2]
        );
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let mut want = a.to_vec();
        want.extend_from_slice(&b);
        assert_eq!(joined, want);
        assert_eq!(
            split_parts(&[], 10).len(),
            1,
            "an empty blob is one empty part"
        );
    }
}
