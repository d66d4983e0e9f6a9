//! The `meshcast` command: `run`, `check-config`, `--version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshcast::config::Config;
use meshcast::node::Node;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "meshcast",
    version,
    about = "Live-media relay: RTMP in, QUIC origin mesh, RTMP and HTTP-FLV out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (standalone on the default ports without --config).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a config file and report every problem in it.
    CheckConfig { file: PathBuf },
    /// Make a cluster CA or a node certificate for mutual TLS on the backbone.
    Cert {
        #[command(subcommand)]
        what: CertCommand,
    },
    /// Print a signed access token (with the first of the config's [auth] secrets, or of
    /// the namespace's own with --ns).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    #[arg(long, short)]
    config: PathBuf,
    /// publish, play, admin or join (repeat for several).
    #[arg(long, required = true)]
    action: Vec<String>,
    /// Stream patterns (`live/demo`, `live/*`); repeat for several. Admin tokens may
    /// leave it out (all streams).
    #[arg(long)]
    stream: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Who the token is for (the `sub` claim, shown to hooks; a join token's
    /// participant identity).
    #[arg(long)]
    subject: Option<String>,
    /// The room a join token admits to.
    #[arg(long)]
    room: Option<String>,
    /// The name a participant is shown by (join tokens).
    #[arg(long)]
    name: Option<String>,
    /// The namespace the token is confined to (an admin token then administers only it);
    /// signed with that namespace's own secrets when it has them.
    #[arg(long)]
    ns: Option<String>,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Make a cluster CA: DIR/ca.pem (every node's backbone.ca) and DIR/ca-key.pem (keep it
    /// off the nodes).
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue node ID a certificate from the CA in --ca: OUT/ID.pem and OUT/ID-key.pem
    /// (backbone.cert and backbone.key).
    Node {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

/// `meshcast token`: prints a token on stdout, or says why it cannot.
fn mint_token(args: TokenArgs) -> Result<String, String> {
    use meshcast::auth::{token, Action, Claims, Keys};
    let c = Config::load(&args.config).map_err(|e| e.to_string())?;
    let own = match &args.ns {
        Some(ns) => {
            let declared = c.namespaces.get(ns).ok_or_else(|| {
                format!(
                    "{}: namespace {ns} is not declared ([[namespace]])",
                    args.config.display()
                )
            })?;
            declared.auth.as_ref()
        }
        None => None,
    };
    let secrets = &own.unwrap_or(&c.auth).secrets;
    if secrets.is_empty() {
        return Err(format!(
            "{}: {} has no secrets to sign with",
            args.config.display(),
            if own.is_some() {
                "the namespace's auth"
            } else {
                "[auth]"
            }
        ));
    }
    let mut act = Vec::new();
    for a in &args.action {
        act.push(
            Action::parse(a)
                .ok_or_else(|| format!("--action {a}: must be publish, play, admin or join"))?,
        );
    }
    if act.contains(&Action::Join) && (args.room.is_none() || args.subject.is_none()) {
        return Err("a join token needs --room ID and --subject IDENTITY".into());
    }
    if args.stream.is_empty()
        && !act
            .iter()
            .any(|a| matches!(a, Action::Admin | Action::Join))
    {
        return Err("--stream is required (e.g. --stream 'live/*')".into());
    }
    if args.ttl == 0 || args.ttl > 10 * 365 * 86_400 {
        return Err("--ttl must be between 1 second and 10 years".into());
    }
    let keys = Keys::new(secrets, &[] as &[&str])?;
    let now = token::now_s();
    keys.mint(&Claims {
        act: token::OneOrMany::Many(act),
        streams: args.stream,
        exp: now + args.ttl,
        nbf: None,
        iat: Some(now),
        sub: args.subject,
        room: args.room,
        name: args.name,
        ns: args.ns,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cert { what } => {
            use meshcast::backbone::pki;
            let made = match what {
                CertCommand::Ca { out, days } => pki::make_ca(&out, days),
                CertCommand::Node { ca, id, out, days } => {
                    if id.is_empty()
                        || id.len() > 64
                        || !id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                    {
                        Err("--id must be a node id: 1-64 of A-Z a-z 0-9 _ - .".into())
                    } else {
                        pki::make_node_cert(&ca, &id, &out, days)
                    }
                }
            };
            match made {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshcast cert: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Token(args) => match mint_token(args) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshcast token: {e}");
                ExitCode::from(2)
            }
        },
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} node `{}` in region `{}`)",
                    file.display(),
                    c.node.role.as_str(),
                    c.node.id,
                    c.node.region
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config: path } => {
            let config = match &path {
                Some(path) => match Config::load(path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                },
                None => Config::standalone_default(),
            };
            let log_level = init_logging(&config.log);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let options = meshcast::node::NodeOptions {
                    config_path: path,
                    log_level: Some(log_level),
                };
                let node = match Node::start_with(config, options).await {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("meshcast: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                wait_for_signal(&node).await;
                tracing::info!("shutting down");
                node.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}

/// Installs the log subscriber (`log.format`, `log.level`; `RUST_LOG` overrides the
/// level) and returns what changes the level on a reload.
fn init_logging(log: &meshcast::config::LogConfig) -> meshcast::node::LogLevelSetter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = log.format == meshcast::config::LogFormat::Json;
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false),
            )
            .init();
    } else {
        // Colours for a terminal only: not in files, journals or collectors.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi))
            .init();
    }
    std::sync::Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Waits for SIGTERM or Ctrl-C; a SIGHUP on the way reloads the config.
async fn wait_for_signal(node: &Node) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                match node.reload() {
                    None => tracing::warn!("SIGHUP ignored: started without --config, nothing to re-read"),
                    Some(Ok(_)) => {}
                    Some(Err(f)) => tracing::warn!("reload failed: {}", f.error),
                }
            }
        }
    }
}
