//! The `connwatch` binary: parse the command line, load the config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use connwatch::config::{Config, ConfigError, LogFormat};
use connwatch::{commands, demo, service};

// mimalloc hands freed memory back to the system, so the start-up peak of parsing a big
// config does not stay in the resident set for the daemon's whole life.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "connwatch",
    version,
    about = "Connection health monitor for unified integration platforms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(ConfigArg),
    /// Validate the config and print every problem with its key.
    CheckConfig(ConfigArg),
    /// Probe one connection now and print the outcome.
    Probe {
        /// The connection's id.
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Every connection's health, last probe and open incident.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create or update the database schema.
    Migrate(ConfigArg),
    /// Send one test email with the [email] settings.
    SendTestEmail {
        /// The recipient.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// A self-contained tour: simulated platform, a credential change, detection, recovery.
    Demo,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file [default: $CONNWATCH_CONFIG, else /etc/connwatch/connwatch.toml]
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&Config::resolve_path(self.config.clone()))
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("connwatch: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    let mut out = std::io::stdout();
    let result = match command {
        Command::Demo => {
            init_logging(LogFormat::Text, "warn");
            demo::run(&mut out).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Run(arg) => match load(&arg) {
            Ok(config) => {
                init_logging(config.log.format, &config.log.level);
                service::run(config, Config::resolve_path(arg.config.clone()))
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Err(code) => return code,
        },
        Command::CheckConfig(arg) => match load(&arg) {
            Ok(config) => commands::check_config(&config, &mut out)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into),
            Err(code) => return code,
        },
        Command::Migrate(arg) => match load(&arg) {
            Ok(config) => {
                init_logging(config.log.format, "warn");
                commands::migrate(&config, &mut out)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Err(code) => return code,
        },
        Command::Status { json, config } => match load(&config) {
            Ok(loaded) => {
                init_logging(loaded.log.format, "warn");
                commands::status(&loaded, json, &mut out)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Err(code) => return code,
        },
        Command::SendTestEmail { to, config } => match load(&config) {
            Ok(loaded) => {
                init_logging(loaded.log.format, "warn");
                commands::send_test_email(&loaded, &to, &mut out)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Err(code) => return code,
        },
        Command::Probe { id, config } => match load(&config) {
            Ok(loaded) => {
                init_logging(loaded.log.format, "warn");
                commands::probe(&loaded, &id, &mut out).await.map(|ok| {
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(3)
                    }
                })
            }
            Err(code) => return code,
        },
    };
    result.unwrap_or_else(|error| {
        eprintln!("connwatch: {error:#}");
        ExitCode::FAILURE
    })
}

/// Loads the config; on failure prints every problem and returns exit code 2.
fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    arg.load().map_err(|error| {
        eprintln!("connwatch: {error}");
        ExitCode::from(2)
    })
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
