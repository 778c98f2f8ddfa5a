//! An image pipeline on the storage ladder: a multi-megabyte photo moves through the tiers
//! as it is captured, downscaled to a preview, then to a thumbnail — and the example prints
//! where each piece landed.
//!
//! `cargo run --example image_pipeline`
//!
//! The pixels are `flowwire::Blob`s: a step that leaves them as they are neither copies
//! nor re-hashes them, and handing them to a driver call clones a reference.
//!
//! The ladder: payloads under 16 KiB inline in the record, under 1 MiB in files on the fast
//! local disk (`nvme`), the rest in files on the bulk disk (`bulk`). Built with the `s3`
//! feature and `FLOWWIRE_S3_ENDPOINT` set (plus `FLOWWIRE_S3_BUCKET`, default `flowwire`, and
//! the standard AWS credential variables), the top tier is that S3 bucket instead:
//!
//! `FLOWWIRE_S3_ENDPOINT=http://127.0.0.1:9000 cargo run --features s3 --example image_pipeline`

use std::path::Path;
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::layout::{Layout, Piece};
use flowwire::storage::{KIB, Ladder, MIB, Retention, Tier};
use flowwire::{Blob, Engine};

/// The camera could not deliver.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("the camera failed: {0}")]
pub struct CameraError(String);

/// A camera service: returns raw RGB pixels.
#[driver(timeout = "30s", retries = 2)]
pub trait Camera {
    /// Captures a `width` × `height` RGB frame.
    async fn capture(&self, width: u32, height: u32) -> Result<Blob, CameraError>;
}

/// The lab refused the job.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("the lab refused the job: {0}")]
pub struct LabError(String);

/// An image-processing service.
#[driver(timeout = "30s", retries = 2)]
pub trait Lab {
    /// Shrinks an RGB image by `factor` in each direction (box filter).
    async fn downscale(
        &self,
        pixels: Blob,
        width: u32,
        height: u32,
        factor: u32,
    ) -> Result<Blob, LabError>;
}

/// One photo on its way from the sensor to a thumbnail.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Photo {
    width: u32,
    height: u32,
    raw: Blob,
    preview: Blob,
    thumbnail: Blob,
}

const PREVIEW: u32 = 4;
const THUMBNAIL: u32 = 8;

/// Capture, preview, thumbnail: each stage keeps only what the next one needs, so the
/// state grows to megabytes and shrinks back to a few kilobytes.
#[flow]
pub struct Darkroom {
    #[link]
    photo: Photo,
    #[link]
    camera: impl Camera,
    #[link]
    lab: impl Lab,
}

#[flow]
impl Darkroom {
    #[probe]
    fn thumbnail_len(&self) -> usize {
        self.photo.thumbnail.len()
    }

    #[wire]
    fn develop(&mut self) -> Command<Self> {
        let p = &self.photo;
        if !p.thumbnail.is_empty() {
            return Command::finish();
        }
        if !p.preview.is_empty() {
            let (w, h) = (p.width / PREVIEW, p.height / PREVIEW);
            return Command::drive(self.lab.downscale(p.preview.clone(), w, h, THUMBNAIL)).then(
                |f, r| {
                    f.photo.thumbnail = r?;
                    f.photo.preview = Blob::default();
                    Ok(())
                },
            );
        }
        if !p.raw.is_empty() {
            return Command::drive(
                self.lab
                    .downscale(p.raw.clone(), p.width, p.height, PREVIEW),
            )
            .then(|f, r| {
                f.photo.preview = r?;
                f.photo.raw = Blob::default();
                Ok(())
            });
        }
        Command::drive(self.camera.capture(p.width, p.height)).then(|f, r| {
            f.photo.raw = r?;
            Ok(())
        })
    }
}

/// A camera that renders a test pattern.
#[derive(Clone)]
struct TestPattern;

#[driver]
impl Camera for TestPattern {
    async fn capture(&self, width: u32, height: u32) -> Result<Blob, CameraError> {
        let (w, h) = (width as usize, height as usize);
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                pixels.extend_from_slice(&[
                    (x % 256) as u8,
                    (y % 256) as u8,
                    ((x ^ y) % 256) as u8,
                ]);
            }
        }
        // A sensor takes its time: long enough to watch the call in flight.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(pixels.into())
    }
}

/// A lab that averages `factor` × `factor` blocks.
#[derive(Clone)]
struct BoxFilter;

#[driver]
impl Lab for BoxFilter {
    async fn downscale(
        &self,
        pixels: Blob,
        width: u32,
        height: u32,
        factor: u32,
    ) -> Result<Blob, LabError> {
        let (w, h, f) = (width as usize, height as usize, factor.max(1) as usize);
        if pixels.len() != w * h * 3 {
            return Err(LabError(format!(
                "{} bytes is not a {w}×{h} RGB image",
                pixels.len()
            )));
        }
        let (ow, oh) = (w / f, h / f);
        let mut out = Vec::with_capacity(ow * oh * 3);
        for oy in 0..oh {
            for ox in 0..ow {
                for c in 0..3 {
                    let mut sum = 0usize;
                    for y in oy * f..(oy + 1) * f {
                        for x in ox * f..(ox + 1) * f {
                            sum += usize::from(pixels[(y * w + x) * 3 + c]);
                        }
                    }
                    out.push((sum / (f * f)) as u8);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(out.into())
    }
}

/// The top tier: S3 when configured (feature `s3` and `FLOWWIRE_S3_ENDPOINT`), else files
/// on the bulk disk.
fn top_tier(dir: &Path) -> Tier {
    #[cfg(feature = "s3")]
    if let Ok(endpoint) = std::env::var("FLOWWIRE_S3_ENDPOINT") {
        let bucket = std::env::var("FLOWWIRE_S3_BUCKET").unwrap_or_else(|_| "flowwire".into());
        let config = flowwire::storage::tier::S3Config::new(&bucket)
            .endpoint(&endpoint)
            .path_style(true)
            .prefix("image-pipeline");
        return Tier::s3(config).named("s3");
    }
    Tier::fs(dir.join("bulk")).named("bulk")
}

/// Prints the pieces of the steps not printed yet: what came in, the state after, and the
/// argument of the call it sent (while that call is in flight).
fn show_new_steps(layout: &Layout, printed: &mut u64) {
    let from = *printed;
    for step in layout.steps.iter().filter(|s| s.seq > from) {
        println!("  step {}: {:?} -> {:?}", step.seq, step.input, step.output);
        show_piece("came in", step.payload.as_ref());
        show_piece("state", step.state.as_ref());
        if step.seq == layout.seq {
            show_piece("call", layout.call.as_ref());
        }
        *printed = step.seq;
    }
}

fn show_piece(label: &str, piece: Option<&Piece>) {
    if let Some(piece) = piece {
        println!("      {label:<8} {piece}");
    }
}

/// Files and bytes under a directory tree.
fn usage(dir: &Path) -> (usize, u64) {
    let mut todo = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0, 0);
    // Bounded: a tier directory is two levels deep (fan-out, then blobs).
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

#[tokio::main]
async fn main() -> Result<(), flowwire::Error> {
    let tmp = tempfile::tempdir().map_err(|source| flowwire::Error::DataDir {
        path: std::env::temp_dir(),
        source,
    })?;
    let dir = tmp.path();
    let ladder = Ladder::new()
        .inline_below(16 * KIB)
        .below(MIB, Tier::fs(dir.join("nvme")).named("nvme"))
        .default_to(top_tier(dir));
    let engine = Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder)
        // Keep the last two steps for time travel; older snapshots are collected.
        .history(Retention::Last(2))
        .flow::<Darkroom>()
        .driver(TestPattern)
        .driver(BoxFilter)
        .start()
        .await?;

    let (width, height) = (1920, 1440);
    println!(
        "developing a {width}×{height} photo ({:.1} MiB raw)",
        f64::from(width * height * 3) / f64::from(1 << 20)
    );
    let photo = engine
        .start::<Darkroom>(
            "photo-1",
            Photo {
                width,
                height,
                ..Photo::default()
            },
        )
        .await?;

    // Watch the instance while the pipeline runs (bounded: one minute). The drivers take
    // 100 ms per call, so every step is seen while it is the newest.
    let mut printed = 0;
    for _ in 0..12_000 {
        let layout = engine.layout::<Darkroom>("photo-1", 100).await?;
        show_new_steps(&layout, &mut printed);
        if !layout.status.is_active() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ended = photo.finished().await?;
    println!(
        "{ended:?}: a {}-byte thumbnail",
        photo.thumbnail_len().await?
    );
    // Garbage collection runs just after each commit; give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("on disk, with the last two steps of history kept:");
    for tier in ["nvme", "bulk"] {
        let (files, bytes) = usage(&dir.join(tier));
        println!("    {tier:<5} {files} blob(s), {bytes} bytes");
    }
    engine.shutdown().await;
    Ok(())
}
