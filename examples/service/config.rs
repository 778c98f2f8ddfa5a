//! The service's command line: which store, which roles, where to serve HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;

use flowwire::{Engine, EngineBuilder, Shared};

use crate::shop::{LocalBank, LocalWarehouse, Order};

pub const USAGE: &str = "\
usage: service [OPTIONS]

Embedded (one process, every role; the default):
  --data-dir DIR       the data directory [default: ./flowwire-data/service]

Several processes meeting in Redis (give --redis or --cluster, and the roles):
  --redis URL          the deployment's Redis, e.g. redis://127.0.0.1:6379/
  --cluster URL,URL    the seed nodes of a Redis Cluster
  --prefix NAME        the deployment's key prefix [default: shop]
  --shards N           shards per flow; every process must agree [default: 16]
  --orchestrator       run the orders' wires
  --worker             run the drivers (warehouse, bank)
  --name NODE          this process's member name [default: generated]

HTTP API (any process may serve it; it starts orders and sends impulses through Redis):
  --http ADDR          listen on ADDR [default: 127.0.0.1:8080 when embedded, off otherwise]
  --help               print this text";

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An option this service does not know.
    #[error("unknown option `{0}` (see --help)")]
    Unknown(String),
    /// An option that needs a value came last.
    #[error("`{0}` needs a value (see --help)")]
    MissingValue(&'static str),
    /// A value that does not parse.
    #[error("`{option}`: {detail}")]
    BadValue {
        /// The option.
        option: &'static str,
        /// What is wrong with its value.
        detail: String,
    },
    /// Role options without a shared store.
    #[error("`{0}` needs --redis or --cluster: an embedded engine plays every role itself")]
    RoleWithoutRedis(&'static str),
    /// A multi-process member that would do nothing.
    #[error("give at least one of --orchestrator, --worker or --http with --redis or --cluster")]
    NoRole,
    /// `--help` was asked for.
    #[error("{USAGE}")]
    Help,
}

/// Where the deployment meets.
#[derive(Debug, Clone)]
pub enum Store {
    /// One process with its own data directory.
    Embedded(PathBuf),
    /// Several processes on one Redis.
    Redis(String),
    /// Several processes on a Redis Cluster.
    Cluster(Vec<String>),
}

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: Store,
    pub prefix: String,
    pub shards: u16,
    pub orchestrator: bool,
    pub worker: bool,
    pub name: Option<String>,
    pub http: Option<SocketAddr>,
}

impl Config {
    /// Parses the options (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Config, ConfigError> {
        let mut data_dir = None;
        let mut redis = None;
        let mut cluster = None;
        let mut prefix = "shop".to_string();
        let mut shards = 16;
        let (mut orchestrator, mut worker) = (false, false);
        let mut name = None;
        let mut http = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value =
                |option: &'static str| args.next().ok_or(ConfigError::MissingValue(option));
            match arg.as_str() {
                "--data-dir" => data_dir = Some(PathBuf::from(value("--data-dir")?)),
                "--redis" => redis = Some(value("--redis")?),
                "--cluster" => {
                    let seeds: Vec<String> = value("--cluster")?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    cluster = Some(seeds);
                }
                "--prefix" => prefix = value("--prefix")?,
                "--shards" => {
                    let v = value("--shards")?;
                    shards = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(ConfigError::BadValue {
                            option: "--shards",
                            detail: format!("`{v}` is not a number from 1 to 65535"),
                        })?;
                }
                "--orchestrator" => orchestrator = true,
                "--worker" => worker = true,
                "--name" => name = Some(value("--name")?),
                "--http" => {
                    let v = value("--http")?;
                    http = Some(v.parse().map_err(|e| ConfigError::BadValue {
                        option: "--http",
                        detail: format!("`{v}`: {e} (write it as 127.0.0.1:8080)"),
                    })?);
                }
                "--help" | "-h" => return Err(ConfigError::Help),
                _ => return Err(ConfigError::Unknown(arg)),
            }
        }
        let store = match (redis, cluster) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::BadValue {
                    option: "--cluster",
                    detail: "give --redis or --cluster, not both".into(),
                });
            }
            (Some(url), None) => Store::Redis(url),
            (None, Some(seeds)) if seeds.is_empty() => {
                return Err(ConfigError::BadValue {
                    option: "--cluster",
                    detail: "no seed node given".into(),
                });
            }
            (None, Some(seeds)) => Store::Cluster(seeds),
            (None, None) => {
                if orchestrator {
                    return Err(ConfigError::RoleWithoutRedis("--orchestrator"));
                }
                if worker {
                    return Err(ConfigError::RoleWithoutRedis("--worker"));
                }
                let dir = data_dir.unwrap_or_else(|| PathBuf::from("flowwire-data/service"));
                http = http.or_else(|| Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
                Store::Embedded(dir)
            }
        };
        if !matches!(store, Store::Embedded(_)) && !orchestrator && !worker && http.is_none() {
            return Err(ConfigError::NoRole);
        }
        Ok(Config {
            store,
            prefix,
            shards,
            orchestrator,
            worker,
            name,
            http,
        })
    }

    /// The engine this configuration asks for.
    pub fn builder(&self) -> Result<EngineBuilder, flowwire::Error> {
        let builder = Engine::builder();
        let shared = match &self.store {
            Store::Embedded(dir) => {
                return Ok(builder
                    .data_dir(dir)
                    .flow::<Order>()
                    .driver(LocalWarehouse)
                    .driver(LocalBank));
            }
            Store::Redis(url) => Shared::redis(url, &self.prefix)?,
            Store::Cluster(seeds) => {
                let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
                Shared::cluster(&seeds, &self.prefix)?
            }
        };
        let shared = match &self.name {
            Some(name) => shared.node_name(name),
            None => shared,
        };
        // Every process registers the flow: clients need its type to start orders and read
        // probes, orchestrators to run it.
        let mut builder = builder.shared(shared.shards(self.shards)).flow::<Order>();
        if self.orchestrator {
            builder = builder.orchestrator();
        }
        if self.worker {
            builder = builder.worker().driver(LocalWarehouse).driver(LocalBank);
        }
        if self.http.is_some() {
            builder = builder.client();
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(args.iter().map(|s| (*s).to_string()))
    }

    #[test]
    fn embedded_by_default_serving_http_on_8080() {
        let c = parse(&[]).unwrap();
        assert!(matches!(c.store, Store::Embedded(_)));
        assert_eq!(c.http, Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
    }

    #[test]
    fn roles_need_redis_and_a_redis_member_needs_a_role() {
        assert!(matches!(
            parse(&["--worker"]),
            Err(ConfigError::RoleWithoutRedis("--worker"))
        ));
        assert!(matches!(
            parse(&["--redis", "redis://127.0.0.1/"]),
            Err(ConfigError::NoRole)
        ));
        let c = parse(&["--redis", "redis://127.0.0.1/", "--worker", "--shards", "8"]).unwrap();
        assert!(c.worker && !c.orchestrator && c.http.is_none());
        assert_eq!(c.shards, 8);
    }

    #[test]
    fn bad_values_say_which_option() {
        let e = parse(&["--shards", "0"]).unwrap_err().to_string();
        assert!(e.starts_with("`--shards`"), "{e}");
        let e = parse(&["--http", "8080"]).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:8080"), "{e}");
        assert!(matches!(
            parse(&["--redis"]),
            Err(ConfigError::MissingValue("--redis"))
        ));
        assert!(matches!(
            parse(&["--verbose"]),
            Err(ConfigError::Unknown(_))
        ));
    }
}
