//! The deployment files shipped in `configs/`: they must be valid for their tools and agree
//! with the default config they deploy.

use std::process::Command;

use crate::harness::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap()
}

/// Every `listen` address of configs/default.toml (services and metrics).
fn default_listen_addresses() -> Vec<String> {
    let config: toml::Value = toml::from_str(&read("configs/default.toml")).unwrap();
    let mut addrs: Vec<String> = config["services"]
        .as_table()
        .unwrap()
        .values()
        .map(|s| s["listen"].as_str().unwrap().to_string())
        .collect();
    addrs.push(config["metrics"]["listen"].as_str().unwrap().to_string());
    addrs.sort();
    addrs
}

/// `wharf check` passes on the shipped config at `path`, its file-get root pointed at the
/// repository's `files/` (the root a deployment config names does not exist here).
fn check_with_the_repository_files(path: &str) {
    check_config_with_the_repository_files(&format!("{ROOT}/{path}"));
}

/// [`check_with_the_repository_files`] for a config file anywhere.
fn check_config_with_the_repository_files(path: &str) {
    let out = Command::new(WHARF)
        .args(["check", "--config", path])
        .env(
            "WHARF_SERVICES__FILES__OPTIONS__ROOT",
            format!("{ROOT}/files"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_socket_unit_listens_where_the_default_config_does() {
    let mut listens: Vec<String> = read("configs/systemd/wharf.socket")
        .lines()
        .filter_map(|l| l.strip_prefix("ListenStream="))
        .map(str::to_string)
        .collect();
    listens.sort();
    assert_eq!(listens, default_listen_addresses());
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have_tool("systemd-analyze", "--version") {
        return;
    }
    let dir = TempDir::new();
    // The units name the installed binary; verify them against this build's.
    let service = read("configs/systemd/wharf.service").replace("/usr/local/bin/wharf", WHARF);
    dir.write("wharf.service", &service);
    dir.write("wharf.socket", &read("configs/systemd/wharf.socket"));
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./wharf.socket", "./wharf.service"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    // `systemctl reload` checks the config, then asks wharf to reload it.
    let reload: Vec<&str> = service
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert_eq!(
        reload,
        [
            format!("{WHARF} check --config /etc/wharf/wharf.toml").as_str(),
            "/bin/kill -HUP $MAINPID"
        ]
    );
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(service.contains(hardening), "{hardening} missing");
    }
}

/// The ports of `listen` keys in a config (services and metrics), by service name.
fn listen_ports(config_text: &str) -> std::collections::BTreeMap<String, u16> {
    let config: toml::Value = toml::from_str(config_text).unwrap();
    let port = |v: &toml::Value| {
        v["listen"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .port()
    };
    let mut ports: std::collections::BTreeMap<String, u16> = config["services"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(name, svc)| (name.clone(), port(svc)))
        .collect();
    ports.insert("metrics".into(), port(&config["metrics"]));
    ports
}

/// Every YAML document of deploy/kubernetes/*.yaml.
fn manifests() -> Vec<serde_yaml::Value> {
    let mut docs = Vec::new();
    for file in ["configmap", "deployment", "services", "pdb", "monitoring"] {
        let text = read(&format!("deploy/kubernetes/{file}.yaml"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde::Deserialize::deserialize(doc).unwrap());
        }
    }
    docs
}

fn kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn container_config_is_valid_and_binds_all_interfaces() {
    // The image's file root does not exist here.
    check_with_the_repository_files("configs/container.toml");
    let text = read("configs/container.toml");
    assert!(
        !text.contains("127.0.0.1"),
        "a container must listen on its interfaces"
    );
    assert!(
        !text.contains("plugin = \"exec\""),
        "exec is opt-in in containers"
    );
}

#[test]
fn kubernetes_manifests_agree_with_the_container_config_and_the_image() {
    let docs = manifests();
    let config = read("configs/container.toml");
    let ports = listen_ports(&config);

    // The ConfigMap carries configs/container.toml verbatim.
    let configmap = kind(&docs, "ConfigMap")[0];
    assert_eq!(
        configmap["data"]["wharf.toml"].as_str(),
        Some(config.as_str())
    );

    // The container exposes exactly the configured ports, named like the services.
    let deployment = kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let exposed: std::collections::BTreeMap<String, u16> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            (name, p["containerPort"].as_u64().unwrap() as u16)
        })
        .collect();
    assert_eq!(exposed, ports);

    // Probes hit the health endpoints on the metrics port; scrapes go there too.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "metrics");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(ports["metrics"].to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The config is mounted where the arguments say, and drains before the pod is killed.
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // --watch-config reloads a changed ConfigMap, which only reaches a directory mount.
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            "/etc/wharf/wharf.toml",
            "--watch-config"
        ]
    );
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/etc/wharf");
    assert!(container["volumeMounts"][0].get("subPath").is_none());
    let grace: toml::Value = toml::from_str(&config).unwrap();
    let grace =
        humantime::parse_duration(grace["server"]["shutdown_grace"].as_str().unwrap()).unwrap();
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace.as_secs() < termination,
        "shutdown_grace must end before SIGKILL"
    );

    // Every Service targets a named container port, and every service port is published.
    let labels = &pod["metadata"]["labels"];
    let mut published = Vec::new();
    for service in kind(&docs, "Service") {
        assert_eq!(&service["spec"]["selector"], labels);
        for port in service["spec"]["ports"].as_sequence().unwrap() {
            let target = port["targetPort"].as_str().unwrap();
            assert!(exposed.contains_key(target), "targetPort {target}");
            published.push(target.to_string());
        }
    }
    published.sort();
    assert_eq!(published, ports.keys().cloned().collect::<Vec<_>>());

    // The ServiceMonitor selects the metrics Service and scrapes /metrics on its port.
    let monitor = kind(&docs, "ServiceMonitor")[0];
    let metrics_service = kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "wharf-metrics")
        .unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(&metrics_service["metadata"]["labels"][k], v);
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");

    // The PodDisruptionBudget covers these pods.
    let pdb = kind(&docs, "PodDisruptionBudget")[0];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    // Same unprivileged user as the image.
    let dockerfile = read("Dockerfile");
    let uid = pod["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap();
    assert!(
        dockerfile.contains(&format!("USER {uid}:")),
        "image user != runAsUser {uid}"
    );
    let expose = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    let mut exposed_by_image: Vec<u16> = expose
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    exposed_by_image.sort();
    let mut configured: Vec<u16> = ports.values().copied().collect();
    configured.sort();
    assert_eq!(exposed_by_image, configured);
}

/// configs/system.toml is the /etc/wharf/wharf.toml template the systemd unit reads: valid,
/// listening where the default (and so the socket unit) does, and with a file-get root the unit
/// makes readable, as an absolute path (the unit's working directory is an empty state dir).
#[test]
fn system_template_is_valid_and_its_data_paths_fit_the_systemd_unit() {
    let text = read("configs/system.toml");
    let template: toml::Value = toml::from_str(&text).unwrap();
    let default: toml::Value = toml::from_str(&read("configs/default.toml")).unwrap();
    for (name, service) in default["services"].as_table().unwrap() {
        assert_eq!(
            template["services"][name]["listen"], service["listen"],
            "services.{name}.listen differs from configs/default.toml"
        );
    }
    assert_eq!(template["metrics"], default["metrics"]);
    let root = template["services"]["files"]["options"]["root"]
        .as_str()
        .unwrap();
    let readable: Vec<String> = read("configs/systemd/wharf.service")
        .lines()
        .filter_map(|l| l.strip_prefix("ReadOnlyPaths=-"))
        .map(str::to_string)
        .collect();
    assert!(
        root.starts_with('/') && readable.iter().any(|p| root.starts_with(p.as_str())),
        "file-get root {root} must be absolute and under the unit's ReadOnlyPaths {readable:?}"
    );
    // The root does not exist on this machine.
    check_with_the_repository_files("configs/system.toml");
}

/// configs/container-tls.toml, what deploy/kubernetes-tls runs: the container config's
/// services on the same ports, valid with real certificate files where it looks for them, and
/// carried verbatim by the overlay's ConfigMap, whose Secrets are mounted exactly there.
#[test]
fn tls_container_config_is_valid_and_the_kubernetes_overlay_mounts_its_files() {
    let text = read("configs/container-tls.toml");
    assert_eq!(
        listen_ports(&text),
        listen_ports(&read("configs/container.toml"))
    );

    // Every file the config names, as the overlay mounts them.
    let mounted: std::collections::BTreeSet<String> = {
        let patch: serde_yaml::Value =
            serde_yaml::from_str(&read("deploy/kubernetes-tls/deployment.yaml")).unwrap();
        let volume = &patch["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(
            volume["name"], "config",
            "the base's config volume, at /etc/wharf"
        );
        volume["projected"]["sources"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|source| source["secret"]["items"].as_sequence())
            .flatten()
            .map(|item| format!("/etc/wharf/{}", item["path"].as_str().unwrap()))
            .collect()
    };
    let config: toml::Value = toml::from_str(&text).unwrap();
    let mut named = std::collections::BTreeSet::new();
    for (name, service) in config["services"].as_table().unwrap() {
        let tls = service
            .get("tls")
            .unwrap_or_else(|| panic!("{name} has no TLS"));
        for key in ["cert", "key", "client_ca"] {
            if let Some(path) = tls.get(key) {
                named.insert(path.as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(named, mounted);

    // Valid with real files there (a fresh CA; its certificate also signs clients).
    let dir = TempDir::new();
    let pki = crate::pki::Pki::new(&dir.0, "deploy");
    let server = pki.server("server");
    std::fs::copy(&server.cert, dir.0.join("tls.crt")).unwrap();
    std::fs::copy(&server.key, dir.0.join("tls.key")).unwrap();
    std::fs::copy(pki.ca_file(), dir.0.join("clients.pem")).unwrap();
    let local = text.replace("/etc/wharf/tls/", &format!("{}/", dir.0.display()));
    let config = dir.write("wharf.toml", &local);
    check_config_with_the_repository_files(config.to_str().unwrap());

    let overlay: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/kubernetes-tls/configmap.yaml")).unwrap();
    assert_eq!(overlay["data"]["wharf.toml"].as_str(), Some(text.as_str()));
}
