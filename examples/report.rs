//! Report generation with fan-out: render every section in parallel, then assemble.
//!
//! `cargo run --example report` — a report asks the warehouse which sections it has, takes
//! its template from the first CDN that answers (`fan_out(..).parallel(1).first(..)`: the
//! mirrors are tried in order until one succeeds), renders every section with at most
//! three renders in flight (`fan_out(..).parallel(3).all(each, then)`: each page is stored
//! as its own durable step, the join runs after the last), and publishes the result.
//! Each render has its own idempotency key, `Report/<id>/<step>.<branch>`, so a renderer
//! that sees a call twice after a crash can return the page it already made.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flowwire::prelude::*;

/// Renders at most this many sections at once.
const RENDERS_IN_FLIGHT: usize = 3;

/// Why a service failed.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(String);

/// The data warehouse.
#[driver(timeout = "10s", retries = 2)]
pub trait Warehouse {
    /// The sections of a report (region codes).
    async fn sections(&self, report: String) -> Result<Vec<String>, ServiceError>;
}

/// The asset CDNs.
#[driver(timeout = "2s", retries = 0)]
pub trait Assets {
    /// The report template, from one mirror.
    async fn template(&self, mirror: String) -> Result<String, ServiceError>;
}

/// The renderer and the publisher.
#[driver(timeout = "30s", retries = 2)]
pub trait Renderer {
    /// Renders one section; returns the page's storage key.
    async fn section(&self, report: String, section: String) -> Result<String, ServiceError>;
    /// Publishes the assembled report; returns its address.
    async fn publish(&self, report: String, pages: Vec<String>) -> Result<String, ServiceError>;
}

/// Where a report stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportState {
    /// The report's name.
    pub report: String,
    /// The CDN mirrors, in order of preference.
    pub mirrors: Vec<String>,
    /// Its sections, once known.
    pub sections: Option<Vec<String>>,
    /// The template, and the mirror that served it.
    pub template: Option<(String, String)>,
    /// The rendered pages, by section index.
    pub pages: Vec<Option<String>>,
    /// Every page is rendered.
    pub rendered: bool,
    /// The published address.
    pub url: Option<String>,
}

/// The report board.
#[flow]
pub struct Report {
    #[link]
    state: ReportState,
    #[link]
    warehouse: impl Warehouse,
    #[link]
    assets: impl Assets,
    #[link]
    renderer: impl Renderer,
}

#[flow]
impl Report {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        let Some(sections) = &s.sections else {
            return Command::drive(self.warehouse.sections(s.report.clone())).then(|f, r| {
                let sections = r?;
                f.state.pages = vec![None; sections.len()];
                f.state.sections = Some(sections);
                Ok(())
            });
        };
        if s.template.is_none() {
            return Command::fan_out(s.mirrors.iter().map(|m| self.assets.template(m.clone())))
                .parallel(1)
                .first(|f, i, r| {
                    // Every mirror failed: the last failure fails the report.
                    let template = r?;
                    f.state.template = Some((f.state.mirrors[i].clone(), template));
                    Ok(())
                });
        }
        if !s.rendered {
            let report = &s.report;
            return Command::fan_out(
                sections
                    .iter()
                    .map(|sec| self.renderer.section(report.clone(), sec.clone())),
            )
            .parallel(RENDERS_IN_FLIGHT)
            .all(
                |f, i, page| {
                    f.state.pages[i] = Some(page?);
                    Ok(())
                },
                |f| {
                    f.state.rendered = true;
                    Ok(())
                },
            );
        }
        if s.url.is_none() {
            let pages = s.pages.iter().flatten().cloned().collect();
            return Command::drive(self.renderer.publish(s.report.clone(), pages)).then(|f, r| {
                f.state.url = Some(r?);
                Ok(())
            });
        }
        Command::finish()
    }

    /// Pages rendered so far, of how many.
    #[probe]
    fn progress(&self) -> (usize, usize) {
        let done = self.state.pages.iter().flatten().count();
        (done, self.state.pages.len())
    }
}

/// The services (here: in-process; mirror `cdn-eu-1` is down).
#[derive(Default)]
struct Services {
    in_flight: AtomicU32,
    most_in_flight: AtomicU32,
    keys: Mutex<Vec<String>>,
}

fn key() -> String {
    CallContext::current().map_or_else(|| "?".into(), |c| c.idempotency_key())
}

#[driver]
impl Warehouse for std::sync::Arc<Services> {
    async fn sections(&self, report: String) -> Result<Vec<String>, ServiceError> {
        println!("  warehouse  sections of {report}");
        Ok([
            "north", "south", "east", "west", "central", "islands", "abroad",
        ]
        .map(String::from)
        .to_vec())
    }
}

#[driver]
impl Assets for std::sync::Arc<Services> {
    async fn template(&self, mirror: String) -> Result<String, ServiceError> {
        if mirror == "cdn-eu-1" {
            println!("  assets     {mirror}: down");
            return Err(ServiceError(format!("{mirror} is down")));
        }
        println!("  assets     {mirror}: template served");
        Ok("quarterly-v3".into())
    }
}

#[driver]
impl Renderer for std::sync::Arc<Services> {
    async fn section(&self, report: String, section: String) -> Result<String, ServiceError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let key = key();
        println!("  renderer   {section:<8} ({now} in flight)  key {key}");
        self.keys.lock().expect("keys").push(key);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(format!("{report}/{section}.pdf"))
    }
    async fn publish(&self, report: String, pages: Vec<String>) -> Result<String, ServiceError> {
        println!("  renderer   publish {report}: {} pages", pages.len());
        Ok(format!("https://reports.example.com/{report}.pdf"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let services = std::sync::Arc::new(Services::default());
    let engine = Engine::builder()
        .data_dir(dir.path())
        .flow::<Report>()
        .driver::<WarehouseProxy, _>(services.clone())
        .driver::<AssetsProxy, _>(services.clone())
        .driver::<RendererProxy, _>(services.clone())
        .start()
        .await?;

    let state = ReportState {
        report: "q3-sales".into(),
        mirrors: vec!["cdn-eu-1".into(), "cdn-eu-2".into(), "cdn-us-1".into()],
        ..ReportState::default()
    };
    let report = engine.start::<Report>("q3-sales", state).await?;
    let ended = report.finished().await?;
    let state = report.state().await?;
    let (done, of) = report.progress().await?;
    println!("ended      {ended:?}: {done} of {of} pages");
    println!("template   {:?}", state.template);
    println!("published  {}", state.url.as_deref().unwrap_or("-"));

    assert_eq!(ended, Ended::Finished);
    assert_eq!((done, of), (7, 7));
    assert_eq!(
        state.template.map(|(mirror, _)| mirror).as_deref(),
        Some("cdn-eu-2"),
        "the first mirror that answered; the third was never asked"
    );
    let most = services.most_in_flight.load(Ordering::SeqCst);
    println!("renders    at most {most} in flight");
    assert!(most as usize <= RENDERS_IN_FLIGHT);
    let mut keys = services.keys.lock().expect("keys").clone();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 7, "one idempotency key per section");

    engine.shutdown().await;
    Ok(())
}
