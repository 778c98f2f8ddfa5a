//! A service binary that embeds flowwire: an order process behind a small HTTP API, in one
//! process on the embedded store, or as any number of orchestrator, worker and API
//! processes meeting in Redis.
//!
//! ```sh
//! cargo run --features redis --example service                 # embedded, HTTP on :8080
//! cargo run --features redis --example service -- --help
//! ```
//!
//! The README's "Running the service" section starts two orchestrators and two workers on
//! one machine. The files: `config.rs` (the command line and the engine it builds),
//! `shop.rs` (the flow and its drivers), `api.rs` (the routes), `http.rs` (the server).

mod api;
mod config;
mod http;
mod shop;

use std::process::ExitCode;

use tokio::sync::watch;

use crate::config::{Config, ConfigError};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(ConfigError::Help) => {
            println!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let engine = match config.builder() {
        Ok(b) => b.start().await,
        Err(e) => Err(e),
    };
    let engine = match engine {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("the engine did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (stop, stopped) = watch::channel(false);
    let server = match config.http {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let addr = listener.local_addr().unwrap_or(addr);
                println!("HTTP on http://{addr}");
                let api = api::Api::new(engine.clone());
                Some(tokio::spawn(http::serve(
                    listener,
                    api,
                    http::Limits::default(),
                    stopped,
                )))
            }
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e}");
                engine.shutdown().await;
                return ExitCode::FAILURE;
            }
        },
    };
    let health = engine.health().await;
    println!(
        "READY roles={} node={}",
        health.roles.join(","),
        health.node.as_deref().unwrap_or("-")
    );
    stop_signal().await;
    println!("stopping");
    let _ = stop.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    // Orchestrators hand their shards over cleanly; workers' calls in flight run again
    // elsewhere after the visibility timeout.
    engine.shutdown().await;
    ExitCode::SUCCESS
}

/// Ctrl-C, or SIGTERM (what `kill` and process managers send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
