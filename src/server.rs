//! Bringing it together: load the gateway file, build the first snapshot,
//! and run the Pingora server; or, with `-t`, report and exit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
use crate::config::load::ProcessFiles;
use crate::config::runtime_dir;
use crate::downstream::head::{HeadLimits, LimitSource};
use crate::downstream::{Admitted, BoundedHttp, Gate};
use crate::filters::Registry;
use crate::pipeline::{load, LastGood, Loaded};
use crate::proxy::Gateway;
use crate::reload::{Live, Reloader};
use crate::snapshot::{Bound, Resolution, Snapshot};
use crate::tcp::tunnel::TcpProxy;
use crate::tls::edge::EdgeAcceptor;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::ssl::{select_next_proto, AlpnError, NameType, SslOptions, SslSessionCacheMode};

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
fn start_refusal(loaded: &Loaded, strict: bool) -> Option<String> {
    let refusing: Vec<&Diagnostic> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error() && (strict || d.kind() == Some("Module")))
        .collect();
    let first = refusing.first()?;
    let why = if strict {
        "--strict refuses to start with invalid resources"
    } else {
        "an invalid Module would drop ip_allow, ip_deny and every other Module setting"
    };
    Some(format!(
        "{why}; {} error(s), the first: {first}",
        refusing.len()
    ))
}

/// Runs the gateway until the process is told to stop.
pub fn serve(
    opt: Opt,
    gateway_path: PathBuf,
    registry: Registry,
    strict: bool,
) -> Result<(), String> {
    // Reloads must find the same files after a daemon changes directory.
    let gateway_path = std::fs::canonicalize(&gateway_path).unwrap_or(gateway_path);
    let loaded = load(
        &gateway_path,
        Resolution::Resolve,
        &registry,
        &LastGood::default(),
    )
    .map_err(|d| d.to_string())?;
    for diagnostic in &loaded.diagnostics {
        match diagnostic.severity {
            Severity::Error => error!("{diagnostic}"),
            Severity::Warning => warn!("{diagnostic}"),
        }
    }
    if let Some(refusal) = start_refusal(&loaded, strict) {
        return Err(refusal);
    }
    let ports = loaded.snapshot.ports();
    let bindings = loaded.snapshot.bindings();
    let admin_addr: SocketAddr = loaded.gateway.admin.listen.parse().map_err(|e| {
        format!(
            "admin.listen {:?}: {e} (expected ip:port)",
            loaded.gateway.admin.listen
        )
    })?;
    if !opt.upgrade {
        // Pingora retries a taken port for 30 s and then stays up with no
        // listener; a supervisor deserves a clear, immediate failure.
        for bound in &bindings {
            ensure_free(bind_address(bound), "listener")?;
        }
        ensure_free(admin_addr, "admin.listen")?;
    }

    let (live, gateway) = Live::new(loaded, registry);
    let live = Arc::new(live);
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

    let snapshot = live.snapshot.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let drain_watch = background_service(
        "drain",
        DrainWatch {
            phases: Mutex::new(Some(server.watch_execution_phase())),
            draining: draining.clone(),
        },
    );
    // Every HTTP connection, on an HTTP port or an HTTPS Host's SNI of a
    // TCPMapping port, bounds its request heads under the limits of the
    // current snapshot; every client connection counts against the caps.
    let limits = head_limits(&snapshot, gateway.downstream);
    let gate = Arc::new(Gate::new(&gateway.downstream));
    let (idle, max_head) = {
        let module = &snapshot.load().module;
        (module.listener_idle_timeout, module.max_request_headers)
    };
    let gateway_proxy = || {
        let mut http = HttpProxy::new(
            Gateway::new(snapshot.clone(), draining.clone()),
            server.configuration.clone(),
        );
        http.handle_init_modules();
        // Cleartext listeners also take HTTP/2 with prior knowledge (h2c),
        // as Envoy's automatic codec does: gRPC clients use it.
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        // HTTP/2 bounds its own frames; these two follow the Module at
        // start (HTTP/1 reads them for every request).
        options.h2_idle_timeout = idle;
        http.server_options = Some(options);
        let mut h2 = default_h2_options();
        h2.max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
        http.h2_options = Some(h2);
        BoundedHttp::new(http, limits.clone(), gate.clone())
    };
    let mut proxy = Service::new(
        "proxy".to_string(),
        Admitted::new(gateway_proxy(), gate.clone()),
    );
    // Ports with TCPMappings have their own app; on a port it shares with
    // an HTTPS Listener it hands the HTTP connections to an HTTP proxy of
    // its own.
    let mut tcp = Service::new(
        "tcp".to_string(),
        Admitted::new(
            TcpProxy::new(snapshot.clone(), gateway_proxy(), &server.configuration),
            gate,
        ),
    );
    for bound in &bindings {
        if bound.binding.tcp() {
            listen(&mut tcp, bound, &snapshot)?;
        } else {
            listen(&mut proxy, bound, &snapshot)?;
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
        crate::upstream::tasks::UpstreamTasks::new(snapshot.clone()),
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

/// Puts the process files the gateway file leaves out in pingress's
/// private directory, made (or checked) now: the new process of an upgrade
/// finds the same paths from the same (canonical) gateway file path.
fn place_process_files(
    conf: &mut ServerConf,
    gateway_path: &Path,
    left: ProcessFiles,
) -> Result<(), String> {
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
            max_age: conf.max_connection_age,
        }
    })
}

/// TLS for one HTTPS listener: certificates and client-certificate policy
/// come from the current snapshot during each handshake, and so does ALPN
/// (h2 only for Hosts whose context offers it).
fn edge_tls_settings(port: u16, snapshot: &Arc<ArcSwap<Snapshot>>) -> Result<TlsSettings, String> {
    let bounds = snapshot
        .load()
        .listener(port)
        .map(|l| l.tls_bounds.clone())
        .unwrap_or_default();
    crate::tls::edge::check_identity_index()?;
    let acceptor = EdgeAcceptor {
        port,
        snapshot: snapshot.clone(),
    };
    let mut settings = TlsSettings::with_callbacks(Box::new(acceptor))
        .map_err(|e| format!("TLS listener on port {port}: {e}"))?;
    let problem = |e| format!("TLS listener on port {port}: {e}");
    // Resumption is decided before the SNI is looked at: a TLS 1.3 ticket
    // from a Host without client certificates would otherwise open a Host
    // that requires them. Every connection does a full handshake.
    settings.set_options(SslOptions::NO_TICKET);
    settings.set_num_tickets(0).map_err(problem)?;
    settings.set_session_cache_mode(SslSessionCacheMode::OFF);
    if bounds.min.is_some() {
        settings
            .set_min_proto_version(bounds.min)
            .map_err(problem)?;
    }
    if bounds.max.is_some() {
        settings
            .set_max_proto_version(bounds.max)
            .map_err(problem)?;
    }
    if let Some(curves) = &bounds.curves {
        settings.set_groups_list(curves).map_err(problem)?;
    }
    let snapshot = snapshot.clone();
    settings.set_alpn_select_callback(move |ssl, offered| {
        let sni = ssl
            .servername(NameType::HOST_NAME)
            .map(str::to_ascii_lowercase);
        let snapshot = snapshot.load();
        if snapshot
            .tcp_port(port)
            .and_then(|p| p.group(sni.as_deref()))
            .is_some()
        {
            // A tunnel's bytes are not necessarily HTTP.
            return Err(AlpnError::NOACK);
        }
        let h2 = snapshot
            .listener(port)
            .and_then(|l| l.tls_host(sni.as_deref()))
            .is_some_and(|(_, edge)| edge.allows_h2());
        let ours: &[u8] = if h2 {
            b"\x02h2\x08http/1.1"
        } else {
            b"\x08http/1.1"
        };
        select_next_proto(ours, offered).ok_or(AlpnError::NOACK)
    });
    Ok(settings)
}

fn listen<A>(
    service: &mut Service<A>,
    bound: &Bound,
    snapshot: &Arc<ArcSwap<Snapshot>>,
) -> Result<(), String> {
    let address = bind_address(bound).to_string();
    if bound.binding.tls() {
        service.add_tls_with_settings(&address, None, edge_tls_settings(bound.port, snapshot)?);
    } else {
        service.add_tcp(&address);
    }
    Ok(())
}

/// Where a port is bound: every IPv4 address unless a TCPMapping names one.
fn bind_address(bound: &Bound) -> SocketAddr {
    SocketAddr::new(
        bound.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        bound.port,
    )
}

fn ensure_free(address: SocketAddr, what: &str) -> Result<(), String> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)
        .map_err(|e| format!("cannot create a socket: {e}"))?;
    // Pingora binds with SO_REUSEADDR; without it here, connections in
    // TIME_WAIT from a previous run would look like a taken port.
    let _ = socket.set_reuse_address(true);
    socket
        .bind(&address.into())
        .and_then(|_| socket.listen(1))
        .map_err(|e| {
            format!("cannot listen on {address} ({what}): {e}; is another gateway running?")
        })
}
