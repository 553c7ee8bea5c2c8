//! Bringing it together: load the gateway file, build the first snapshot,
//! and run the Pingora server; or, with `-t`, report and exit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{error, info, warn};
use pingora::apps::HttpServerOptions;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::background_service;
use pingora::services::background::BackgroundService;
use pingora::services::listening::Service;
use std::sync::Mutex;
use tokio::sync::broadcast;

use crate::admin::{AdminApp, ReadinessProbe};
use crate::config::diagnostics::{Diagnostic, Severity};
use crate::config::downstream::DownstreamConf;
use crate::config::load::{GatewayFile, ProcessFiles};
use crate::config::runtime_dir;
use crate::downstream::drain::Drains;
use crate::downstream::head::{HeadLimits, LimitSource};
use crate::downstream::tls::{EdgeHandshakes, ListenerTlsError};
use crate::downstream::{Admitted, BoundedHttp, Door, Gate};
use crate::filters::Registry;
use crate::pipeline::{load, LastGood, Loaded};
use crate::proxy::Gateway;
use crate::reload::{Live, Reloader};
use crate::snapshot::{Bound, Resolution, Snapshot};
use crate::tcp::tunnel::TcpProxy;

/// The gateway file used when `-c` is not given.
pub const DEFAULT_GATEWAY_FILE: &str = "conf/pingress.yaml";

/// Seconds the old process keeps serving after SIGQUIT/SIGTERM when the
/// gateway file does not say; Pingora's own default is 300.
const DEFAULT_GRACE_PERIOD_SECONDS: u64 = 10;

/// `pingress -t`: every problem, then a count per kind. Exit 1 on errors.
pub fn check(loaded: &Loaded, out: &mut impl std::io::Write) -> std::io::Result<i32> {
    for diagnostic in &loaded.diagnostics {
        writeln!(out, "{diagnostic}")?;
    }
    for (kind, count) in &loaded.model.accepted {
        writeln!(out, "{kind}: {count} accepted")?;
    }
    let errors = loaded.errors();
    let warnings = loaded.diagnostics.len() - errors;
    if errors > 0 {
        if loaded
            .diagnostics
            .iter()
            .any(|d| d.is_error() && d.kind() == Some("Module"))
        {
            writeln!(
                out,
                "the Module is invalid: the gateway will not start with it"
            )?;
        }
        writeln!(
            out,
            "configuration has {errors} error(s) and {warnings} warning(s): invalid resources \
             are left out, or refuse where they guard something"
        )?;
        Ok(1)
    } else {
        writeln!(out, "configuration OK ({warnings} warning(s))")?;
        Ok(0)
    }
}

/// Why a configuration may not start serving: an invalid Module (it
/// holds ip_allow/ip_deny and every request-wide setting, and has no
/// earlier version to fall back to at start), or, with `--strict`, any
/// invalid resource.
fn start_refusal(loaded: &Loaded, strict: bool) -> Option<ServeError> {
    let refusing: Vec<&Diagnostic> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error() && (strict || d.kind() == Some("Module")))
        .collect();
    let first = Box::new((*refusing.first()?).clone());
    let errors = refusing.len();
    Some(match strict {
        true => ServeError::Strict { errors, first },
        false => ServeError::InvalidModule { errors, first },
    })
}

/// Why the gateway did not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gateway file, or what it names, cannot be read.
    #[error("{0}")]
    Load(Box<Diagnostic>),
    #[error(
        "--strict refuses to start with invalid resources; {errors} error(s), the first: {first}"
    )]
    Strict {
        errors: usize,
        first: Box<Diagnostic>,
    },
    #[error(
        "an invalid Module would drop ip_allow, ip_deny and every other Module setting; \
         {errors} error(s), the first: {first}"
    )]
    InvalidModule {
        errors: usize,
        first: Box<Diagnostic>,
    },
    #[error("admin.listen {listen:?}: {error} (expected ip:port)")]
    AdminListen {
        listen: String,
        error: std::net::AddrParseError,
    },
    #[error("cannot create a socket: {0}")]
    Socket(std::io::Error),
    /// `what` names the address's key.
    #[error("cannot listen on {address} ({what}): {error}; is another gateway running?")]
    Taken {
        address: SocketAddr,
        what: &'static str,
        error: std::io::Error,
    },
    #[error(transparent)]
    RuntimeDir(#[from] runtime_dir::RuntimeDirError),
    #[error(transparent)]
    Tls(#[from] ListenerTlsError),
}

/// Runs the gateway until the process is told to stop.
pub fn serve(
    opt: Opt,
    gateway_path: PathBuf,
    registry: Registry,
    strict: bool,
) -> Result<(), ServeError> {
    // Reloads must find the same files after a daemon changes directory.
    let gateway_path = std::fs::canonicalize(&gateway_path).unwrap_or(gateway_path);
    let loaded = first_load(&gateway_path, &registry, strict)?;
    let ports = loaded.snapshot.ports();
    let bindings = loaded.snapshot.bindings();
    let listen = &loaded.gateway.admin.listen;
    let admin_addr: SocketAddr = listen.parse().map_err(|error| ServeError::AdminListen {
        listen: listen.clone(),
        error,
    })?;
    if !opt.upgrade {
        // Pingora retries a taken port for 30 s and then stays up with no
        // listener; a supervisor deserves a clear, immediate failure.
        for bound in &bindings {
            ensure_free(bind_address(bound), "listener")?;
        }
        ensure_free(admin_addr, "admin.listen")?;
    }

    let cluster_states = loaded.last_good.clusters().clone();
    let (live, gateway) = Live::new(loaded, registry);
    let live = Arc::new(live);
    let downstream = gateway.downstream;
    let mut server = pingora_server(opt, gateway)?;
    let draining = Arc::new(AtomicBool::new(false));
    let drain_watch = background_service(
        "drain",
        DrainWatch {
            phases: Mutex::new(Some(server.watch_execution_phase())),
            draining: draining.clone(),
        },
    );
    let door = Arc::new(client_door(&server, &live, &bindings, downstream)?);
    let http = HttpApps {
        snapshot: live.snapshot.clone(),
        draining,
        conf: server.configuration.clone(),
        limits: head_limits(&live.snapshot, downstream),
        gate: door.gate.clone(),
    };
    let mut proxy = Service::new("proxy".to_string(), Admitted::new(http.app(), door.clone()));
    // Ports with TCPMappings have their own app; on a port it shares with
    // an HTTPS Listener it hands the HTTP connections to an HTTP proxy of
    // its own.
    let tunnels = TcpProxy::new(live.snapshot.clone(), http.app(), &server.configuration);
    let mut tcp = Service::new("tcp".to_string(), Admitted::new(tunnels, door));
    // TLS ports listen in cleartext too: `Admitted` shakes hands.
    for bound in &bindings {
        let address = bind_address(bound).to_string();
        if bound.binding.tcp() {
            tcp.add_tcp(&address);
        } else {
            proxy.add_tcp(&address);
        }
    }
    let ready = Arc::new(AtomicBool::new(false));
    let mut admin = Service::new(
        "admin".to_string(),
        AdminApp::new(ready.clone(), live.clone()),
    );
    admin.add_tcp(&admin_addr.to_string());
    admin.threads = Some(1);
    let probe = background_service("readiness", ReadinessProbe { ports, ready });
    let upstream_tasks = background_service(
        "upstream tasks",
        crate::upstream::tasks::UpstreamTasks::new(cluster_states),
    );
    let reloader = background_service("reload", Reloader::new(gateway_path, live));

    server.add_service(proxy);
    if bindings.iter().any(|b| b.binding.tcp()) {
        server.add_service(tcp);
    }
    server.add_service(admin);
    server.add_service(probe);
    server.add_service(reloader);
    server.add_service(upstream_tasks);
    server.add_service(drain_watch);
    server.run_forever()
}

/// The configuration the gateway starts with, its problems logged; an
/// error when it must not start on it (see [`start_refusal`]).
fn first_load(
    gateway_path: &Path,
    registry: &Registry,
    strict: bool,
) -> Result<Loaded, ServeError> {
    let loaded = load(
        gateway_path,
        Resolution::Resolve,
        registry,
        &LastGood::default(),
    )
    .map_err(ServeError::Load)?;
    for diagnostic in &loaded.diagnostics {
        match diagnostic.severity {
            Severity::Error => error!("{diagnostic}"),
            Severity::Warning => warn!("{diagnostic}"),
        }
    }
    match start_refusal(&loaded, strict) {
        Some(refusal) => Err(refusal),
        None => Ok(loaded),
    }
}

/// Pingora's server on the gateway file's `pingora:` settings, with the
/// process files placed and pingress's grace period, bootstrapped (on
/// `-u`, it takes the old process's listeners here).
fn pingora_server(opt: Opt, gateway: GatewayFile) -> Result<Server, ServeError> {
    let mut conf = gateway.pingora;
    place_process_files(&mut conf, &gateway.path, gateway.left_to_pingress)?;
    conf.grace_period_seconds
        .get_or_insert(DEFAULT_GRACE_PERIOD_SECONDS);
    let opt = Opt {
        conf: None,
        test: false,
        ..opt
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    Ok(server)
}

/// What every client connection passes: the caps, the TLS handshake of
/// the ports that have TLS, and the drains that may end it early.
fn client_door(
    server: &Server,
    live: &Live,
    bindings: &[Bound],
    downstream: DownstreamConf,
) -> Result<Door, ServeError> {
    let tls_ports = bindings.iter().filter(|b| b.binding.tls()).map(|b| b.port);
    // A connection past its age gets as long to finish as Pingora gives a
    // shutting-down runtime's tasks (`graceful_shutdown_timeout_seconds`,
    // 5 s by default).
    let grace = server
        .configuration
        .graceful_shutdown_timeout_seconds
        .unwrap_or(5);
    Ok(Door {
        gate: Arc::new(Gate::new(&downstream)),
        handshakes: EdgeHandshakes::new(tls_ports, &live.snapshot, downstream.head_timeout)?,
        drains: Drains::new(
            live.snapshot.clone(),
            live.swaps(),
            downstream.max_connection_age,
            downstream.tls_drain_window,
            Duration::from_secs(grace),
        ),
    })
}

/// What each HTTP app of the gateway is built from: one for the HTTP and
/// HTTPS ports, one for the HTTPS Hosts of each TCPMapping port.
struct HttpApps {
    snapshot: Arc<ArcSwap<Snapshot>>,
    draining: Arc<AtomicBool>,
    conf: Arc<ServerConf>,
    /// Every HTTP connection bounds its request heads under the limits of
    /// the current snapshot.
    limits: LimitSource,
    gate: Arc<Gate>,
}

impl HttpApps {
    fn app(&self) -> BoundedHttp<HttpProxy<Gateway>> {
        let mut http = HttpProxy::new(
            Gateway::new(self.snapshot.clone(), self.draining.clone()),
            self.conf.clone(),
        );
        http.handle_init_modules();
        // Cleartext listeners also take HTTP/2 with prior knowledge (h2c),
        // as Envoy's automatic codec does: gRPC clients use it.
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        // HTTP/2 bounds its own frames; these two follow the Module of the
        // snapshot serving when the app is built, at start (HTTP/1 reads
        // them for every request).
        let module = &self.snapshot.load().module;
        options.h2_idle_timeout = module.listener_idle_timeout;
        http.server_options = Some(options);
        let mut h2 = default_h2_options();
        h2.max_header_list_size(u32::try_from(module.max_request_headers).unwrap_or(u32::MAX));
        http.h2_options = Some(h2);
        BoundedHttp::new(http, self.limits.clone(), self.gate.clone())
    }
}

/// Puts the process files the gateway file leaves out in pingress's
/// private directory, made (or checked) now: the new process of an upgrade
/// finds the same paths from the same (canonical) gateway file path.
fn place_process_files(
    conf: &mut ServerConf,
    gateway_path: &Path,
    left: ProcessFiles,
) -> Result<(), ServeError> {
    if left == ProcessFiles::default() {
        return Ok(());
    }
    let dir = runtime_dir::default_dir();
    runtime_dir::ensure_private(&dir)?;
    let (socket, pid) = runtime_dir::file_names(gateway_path);
    if left.upgrade_sock {
        conf.upgrade_sock = dir.join(socket).to_string_lossy().into_owned();
    }
    if left.pid_file {
        conf.pid_file = dir.join(pid).to_string_lossy().into_owned();
    }
    info!(
        "upgrade socket {}, pid file {}",
        conf.upgrade_sock, conf.pid_file
    );
    Ok(())
}

/// Raises `draining` when the process starts to hand its sockets to a new
/// one (`-u`, then SIGQUIT) or to shut down, so responses from then on close
/// their connections.
pub struct DrainWatch {
    phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    draining: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().ok().and_then(|mut p| p.take()) else {
            return;
        };
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(
                        ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulUpgradeCloseTimeout
                        | ExecutionPhase::GracefulTerminate
                        | ExecutionPhase::ShutdownStarted,
                    ) => {
                        info!("draining: responses now close their connections");
                        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = shutdown.changed() => {
                    self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// The request head limits of the serving configuration: the Module's,
/// read as each request begins, and the gateway file's head deadline and
/// connection age.
fn head_limits(snapshot: &Arc<ArcSwap<Snapshot>>, conf: DownstreamConf) -> LimitSource {
    let snapshot = snapshot.clone();
    Arc::new(move || {
        let module = &snapshot.load().module;
        HeadLimits {
            deadline: conf.head_timeout,
            idle: module.listener_idle_timeout,
            max_bytes: module.max_request_headers,
        }
    })
}

/// Where a port is bound: every IPv4 address unless a TCPMapping names one.
fn bind_address(bound: &Bound) -> SocketAddr {
    SocketAddr::new(
        bound.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        bound.port,
    )
}

fn ensure_free(address: SocketAddr, what: &'static str) -> Result<(), ServeError> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)
        .map_err(ServeError::Socket)?;
    // Pingora binds with SO_REUSEADDR; without it here, connections in
    // TIME_WAIT from a previous run would look like a taken port.
    let _ = socket.set_reuse_address(true);
    socket
        .bind(&address.into())
        .and_then(|_| socket.listen(1))
        .map_err(|error| ServeError::Taken {
            address,
            what,
            error,
        })
}
