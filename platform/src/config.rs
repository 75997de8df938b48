//! Typed configuration read from the environment (or the equivalent `--flag`).
//!
//! Every setting has a default that matches the services `scripts/` starts on loopback, so a
//! developer sets nothing. Values are parsed when a binary starts: an invalid one stops it with
//! a message that names the variable, the value and what was expected (clap's errors), instead
//! of failing later deep inside a connection attempt.

use std::time::Duration;

/// Where the shared infrastructure lives. Flattened into each binary's own arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InfraConfig {
    /// PostgreSQL connection URL (event store, outbox, read models).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://shop:shop@127.0.0.1:5432/shop",
        value_parser = POSTGRES_URL
    )]
    pub database_url: String,

    /// PostgreSQL connections for the command API (checkouts, cancels).
    #[arg(long, env = "DATABASE_POOL_COMMANDS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_commands: u32,

    /// PostgreSQL connections for GraphQL queries, so a slow query cannot take the
    /// connections checkouts need.
    #[arg(long, env = "DATABASE_POOL_QUERIES", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_queries: u32,

    /// PostgreSQL connections for the workers (relay, projectors, saga, rebuilds).
    #[arg(long, env = "DATABASE_POOL_WORKERS", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_workers: u32,

    /// `statement_timeout` of the command API's connections.
    #[arg(long, env = "DATABASE_COMMAND_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub database_command_timeout: Duration,

    /// `statement_timeout` of GraphQL's connections (a query abandoned by its own timeout
    /// stops in PostgreSQL too).
    #[arg(long, env = "DATABASE_QUERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub database_query_timeout: Duration,

    /// `statement_timeout` of the workers' connections.
    #[arg(long, env = "DATABASE_WORKER_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub database_worker_timeout: Duration,

    /// Kafka bootstrap servers, comma separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092", value_parser = parse_brokers)]
    pub kafka_brokers: String,

    /// Prefix put in front of every Kafka topic name (e.g. `staging.` or a per-test prefix).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub kafka_topic_prefix: String,

    /// Partition count used when the project creates its topics.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub kafka_partitions: i32,

    /// How long the `user-activity` topic keeps events (`retention.ms`, set when the topic
    /// is created): what a rebuild of the analytics can replay.
    #[arg(long, env = "ACTIVITY_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub activity_retention: Duration,

    /// How Kafka clients talk to the brokers: `plaintext` or `ssl` (TLS).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "plaintext",
          value_parser = ["plaintext", "ssl"])]
    pub kafka_security_protocol: String,

    /// With `ssl`: the CA certificate(s) (PEM file) that signed the brokers' certificates;
    /// the system's CAs when unset.
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<String>,

    /// With `ssl` and client authentication: this client's certificate and key (PEM files).
    #[arg(
        long,
        env = "KAFKA_SSL_CERTIFICATE_LOCATION",
        requires = "kafka_ssl_key_location"
    )]
    pub kafka_ssl_certificate_location: Option<String>,

    #[arg(
        long,
        env = "KAFKA_SSL_KEY_LOCATION",
        requires = "kafka_ssl_certificate_location"
    )]
    pub kafka_ssl_key_location: Option<String>,

    /// RabbitMQ connection URL (the vhost is the URL's path, `%2f` for `/`).
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_parser = AMQP_URL
    )]
    pub amqp_url: String,

    /// Development mode: `shop run` starts without configured keys (making random ones) and
    /// the stand-in participants accept fault injection. Never in production.
    #[arg(long, env = "SHOP_DEV_MODE", default_value_t = false, action = clap::ArgAction::Set)]
    pub dev_mode: bool,
}

impl Default for InfraConfig {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl InfraConfig {
    /// Reads the settings from the environment alone (tests, tools without flags).
    pub fn from_env() -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct EnvOnly {
            #[command(flatten)]
            infra: InfraConfig,
        }
        <EnvOnly as clap::Parser>::try_parse_from(["shop"]).map(|e| e.infra)
    }

    /// The full name of one of the project's topics, prefix included.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.kafka_topic_prefix, name)
    }
}

/// A connection URL's parser that, unlike a plain function, never repeats the value in its
/// error: clap's own message would print the whole URL, password included.
#[derive(Clone, Copy)]
struct SecretUrl {
    schemes: &'static [&'static str],
    example: &'static str,
}

impl clap::builder::TypedValueParser for SecretUrl {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let url = value.to_str().unwrap_or("");
        if self.schemes.iter().any(|s| url.starts_with(s)) {
            return Ok(url.to_owned());
        }
        let name = arg.map_or_else(|| "the URL".to_owned(), |a| format!("'{a}'"));
        let message = format!(
            "invalid value for {name} (not shown, as it may hold a password): expected a URL like {}\n",
            self.example
        );
        Err(clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd))
    }
}

const POSTGRES_URL: SecretUrl = SecretUrl {
    schemes: &["postgres://", "postgresql://"],
    example: "postgres://user:password@host:5432/database",
};

const AMQP_URL: SecretUrl = SecretUrl {
    schemes: &["amqp://", "amqps://"],
    example: "amqp://user:password@host:5672/%2f",
};

fn parse_brokers(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split(',').all(|b| {
            b.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected comma separated host:port pairs, e.g. 127.0.0.1:9092".into())
    }
}

/// `url` with its password (if any) replaced by `***`, for messages and logs: connection
/// URLs carry credentials and error messages travel far.
pub fn redacted(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{out}?{}", params.join("&"));
    }
    out
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The userinfo ends at the last `@` before the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = (&rest[..at], &rest[at..]);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}"),
        None => url.to_owned(),
    }
}

/// Parses durations written as `250ms`, `5s`, `2m` or `1h` (for flags such as poll intervals).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 250ms, 5s, 2m, 1h or 7d"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("unknown unit in `{s}`; use ms, s, m, h or d")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        infra: InfraConfig,
    }

    #[test]
    fn defaults_match_the_local_scripts() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let d = InfraConfig::default();
        assert_eq!(cli.infra.database_url, d.database_url);
        assert_eq!(cli.infra.kafka_brokers, d.kafka_brokers);
        assert_eq!(cli.infra.amqp_url, d.amqp_url);
        assert_eq!(cli.infra.kafka_partitions, d.kafka_partitions);
    }

    #[test]
    fn invalid_values_name_the_setting() {
        for (flag, value, expect) in [
            ("--database-url", "mysql://x", "postgres://"),
            ("--kafka-brokers", "localhost", "host:port"),
            ("--kafka-partitions", "0", "0"),
            ("--amqp-url", "http://x", "amqp://"),
        ] {
            let err = Cli::try_parse_from(["x", flag, value])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(flag), "{err}");
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redacted("postgres://shop:s3cr%40t@db:5432/shop"),
            "postgres://shop:***@db:5432/shop"
        );
        assert_eq!(
            redacted("amqp://guest:p@ss@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redacted("postgres://db/shop"), "postgres://db/shop");
        assert_eq!(
            redacted("postgres://db/shop?user=u&password=pw&sslmode=require"),
            "postgres://db/shop?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redacted("postgres://user@db/shop"),
            "postgres://user@db/shop"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }
}

/// A configuration's defaults as its clap attributes declare them (the environment
/// ignored), so each default is written once: in the `#[arg(default_value...)]` that the
/// command line shows. `Default` impls of configurations call this.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|a| a.env(None));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<String>())
        .expect("every setting has a default");
    T::from_arg_matches(&matches).expect("the defaults parse")
}

#[cfg(test)]
mod default_tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_attributes_and_ignore_the_environment() {
        let d: InfraConfig = defaults();
        assert_eq!(d.database_pool_commands, 8);
        assert_eq!(d.database_command_timeout, Duration::from_secs(5));
        assert_eq!(d.kafka_partitions, 6);
        assert_eq!(d.kafka_brokers, "127.0.0.1:9092");
        assert_eq!(d.kafka_topic_prefix, "");
    }
}
