//! The plugin's side: what the container runtime runs (CNI spec 1.x, chained after the main
//! plugin). It reads the runtime's environment and config, asks the agent, and prints the
//! previous result unchanged, or a CNI error that fails the pod's creation.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use mesh_manifests::PodKey;
use serde_json::{Value, json};

use super::{DEFAULT_EXEMPT_NAMESPACES, DEFAULT_SOCKET, MAX_MESSAGE, Request, Response};

const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];
/// CNI's well-known error codes, and ours (100+).
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENVIRONMENT: u32 = 4;
const DECODING_FAILURE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const PLUGIN_NOT_AVAILABLE: u32 = 50;
const NOT_CAPTURED: u32 = 100;
const MAX_CONFIG: usize = 1024 * 1024;

/// A failure the runtime gets as a CNI error.
#[derive(Debug)]
pub struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }
}

/// The plugin's own settings, from its entry in the network config list.
#[derive(Debug)]
struct PluginConfig {
    cni_version: String,
    socket: PathBuf,
    timeout: Duration,
    exempt_namespaces: Vec<String>,
    prev_result: Option<Value>,
}

impl PluginConfig {
    fn parse(config: &Value) -> Result<Self, CniError> {
        let invalid = |what: &str| CniError::new(INVALID_CONFIG, format!("nodemesh-cni config: {what}"), "");
        let cni_version = match config.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            None => "1.0.0".into(),
            Some(_) => return Err(invalid("cniVersion must be a string")),
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                INCOMPATIBLE_VERSION,
                format!("nodemesh-cni does not support CNI version {cni_version}"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let socket = match config.get("agentSocket") {
            Some(Value::String(path)) if path.starts_with('/') => PathBuf::from(path),
            None => PathBuf::from(DEFAULT_SOCKET),
            Some(_) => return Err(invalid("agentSocket must be an absolute path")),
        };
        let timeout = match config.get("timeoutSeconds") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(secs @ 1..=600) => Duration::from_secs(secs),
                _ => return Err(invalid("timeoutSeconds must be between 1 and 600")),
            },
            None => Duration::from_secs(30),
            Some(_) => return Err(invalid("timeoutSeconds must be a number")),
        };
        let exempt_namespaces = match config.get("exemptNamespaces") {
            Some(Value::Array(names)) => names
                .iter()
                .map(|n| {
                    n.as_str().map(str::to_owned).ok_or_else(|| invalid("exemptNamespaces must be strings"))
                })
                .collect::<Result<_, _>>()?,
            None => DEFAULT_EXEMPT_NAMESPACES.iter().map(|n| (*n).to_owned()).collect(),
            Some(_) => return Err(invalid("exemptNamespaces must be a list")),
        };
        Ok(PluginConfig {
            cni_version,
            socket,
            timeout,
            exempt_namespaces,
            prev_result: config.get("prevResult").cloned(),
        })
    }
}

/// Runs one CNI command from the environment and stdin; prints the result or the error.
pub fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_CONFIG as u64 + 1).read_to_end(&mut stdin);
    let (version, outcome) = match read {
        Ok(_) if stdin.len() > MAX_CONFIG => {
            (None, Err(CniError::new(DECODING_FAILURE, "network config larger than 1 MiB", "")))
        }
        Ok(_) => run(&env, &stdin),
        Err(err) => {
            (None, Err(CniError::new(DECODING_FAILURE, "cannot read the network config", err.to_string())))
        }
    };
    let version = version.unwrap_or_else(|| "1.0.0".into());
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            let error =
                json!({"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details});
            println!("{error}");
            eprintln!(
                "nodemesh-cni: {}{}",
                err.msg,
                if err.details.is_empty() { String::new() } else { format!(": {}", err.details) }
            );
            ExitCode::FAILURE
        }
    }
}

/// Returns the CNI version in use (for the error) and what to print.
fn run(env: &HashMap<String, String>, stdin: &[u8]) -> (Option<String>, Result<Option<String>, CniError>) {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        let versions = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        return (None, Ok(Some(versions.to_string())));
    }
    let config: Value = match serde_json::from_slice(stdin) {
        Ok(config) => config,
        Err(err) => {
            return (
                None,
                Err(CniError::new(DECODING_FAILURE, "the network config is not JSON", err.to_string())),
            );
        }
    };
    let config = match PluginConfig::parse(&config) {
        Ok(config) => config,
        Err(err) => return (None, Err(err)),
    };
    let version = Some(config.cni_version.clone());
    let outcome = match command {
        "ADD" => add(env, &config),
        "DEL" => del(env, &config).map(|()| None),
        "CHECK" => check(env, &config).map(|()| None),
        "STATUS" => status(&config).map(|()| None),
        "GC" => Ok(None),
        "" => Err(CniError::new(
            INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "nodemesh-cni is run by the container runtime",
        )),
        other => Err(CniError::new(INVALID_ENVIRONMENT, format!("unknown CNI_COMMAND {other:?}"), "")),
    };
    (version, outcome)
}

/// The pod a Kubernetes runtime names in `CNI_ARGS` (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…`).
fn pod_of(env: &HashMap<String, String>) -> Option<PodKey> {
    let args = env.get("CNI_ARGS")?;
    let arg = |key: &str| {
        args.split(';')
            .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
    };
    Some(PodKey { namespace: arg("K8S_POD_NAMESPACE")?, name: arg("K8S_POD_NAME")? })
}

/// The Kubernetes pod the agent must be asked about: none for a sandbox that is not a
/// Kubernetes pod, or one of an exempt namespace.
fn pod_to_ask_about(env: &HashMap<String, String>, config: &PluginConfig) -> Option<PodKey> {
    pod_of(env).filter(|pod| !config.exempt_namespaces.contains(&pod.namespace))
}

fn required<'e>(env: &'e HashMap<String, String>, key: &str) -> Result<&'e str, CniError> {
    env.get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(INVALID_ENVIRONMENT, format!("{key} is not set"), ""))
}

/// The first IPv4 address of the previous plugin's result (`ips[].address`, CIDR notation).
fn first_ipv4(prev_result: &Value) -> Option<Ipv4Addr> {
    prev_result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let address = ip.get("address")?.as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

/// The previous result, passed on in the config's CNI version.
fn pass_on(config: &PluginConfig) -> Result<Option<String>, CniError> {
    let mut result = config.prev_result.clone().unwrap_or_else(|| json!({}));
    result["cniVersion"] = json!(config.cni_version);
    Ok(Some(result.to_string()))
}

fn add(env: &HashMap<String, String>, config: &PluginConfig) -> Result<Option<String>, CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?.to_owned();
    let netns = required(env, "CNI_NETNS")?;
    let Some(prev_result) = &config.prev_result else {
        return Err(CniError::new(
            INVALID_CONFIG,
            "nodemesh-cni is a chained plugin: it needs the main plugin's prevResult",
            "list it after the cluster's network plugin in the .conflist",
        ));
    };
    let Some(pod) = pod_to_ask_about(env, config) else { return pass_on(config) };
    let Some(ip) = first_ipv4(prev_result) else {
        return Err(CniError::new(
            NOT_CAPTURED,
            format!("pod {pod} has no IPv4 address in the main plugin's result"),
            "nodemesh captures IPv4 pods only",
        ));
    };
    let wait_secs = config.timeout.as_secs();
    let request = Request::Add { pod: pod.clone(), container_id, netns: PathBuf::from(netns), ip, wait_secs };
    let response = ask(config, &request)?;
    if response.ok {
        pass_on(config)
    } else {
        Err(CniError::new(NOT_CAPTURED, format!("nodemesh cannot capture pod {pod}"), response.message))
    }
}

/// DEL never fails a pod's teardown: an unreachable agent forgets the pod when it sees the
/// netns gone.
fn del(env: &HashMap<String, String>, config: &PluginConfig) -> Result<(), CniError> {
    let (Some(pod), Some(container_id)) = (pod_to_ask_about(env, config), env.get("CNI_CONTAINERID")) else {
        return Ok(());
    };
    if let Err(err) = ask(config, &Request::Del { pod, container_id: container_id.clone() }) {
        eprintln!(
            "nodemesh-cni: DEL not delivered ({}: {}); the agent cleans up later",
            err.msg, err.details
        );
    }
    Ok(())
}

fn check(env: &HashMap<String, String>, config: &PluginConfig) -> Result<(), CniError> {
    let Some(pod) = pod_to_ask_about(env, config) else { return Ok(()) };
    let response = ask(config, &Request::Check { pod: pod.clone() })?;
    if response.ok {
        Ok(())
    } else {
        Err(CniError::new(NOT_CAPTURED, format!("pod {pod} is not captured"), response.message))
    }
}

fn status(config: &PluginConfig) -> Result<(), CniError> {
    let response = ask(config, &Request::Status)
        .map_err(|err| CniError::new(PLUGIN_NOT_AVAILABLE, err.msg, err.details))?;
    if response.ok {
        Ok(())
    } else {
        Err(CniError::new(PLUGIN_NOT_AVAILABLE, "the nodemesh agent is not ready", response.message))
    }
}

/// Sends one request to the agent and reads its answer.
fn ask(config: &PluginConfig, request: &Request) -> Result<Response, CniError> {
    let socket = config.socket.display();
    let unreachable = |err: std::io::Error| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("the nodemesh agent (mesh-node) is not reachable at {socket}"),
            format!("{err}; pods of ambient namespaces cannot start uncaptured, so they wait for it"),
        )
    };
    let mut stream = UnixStream::connect(&config.socket).map_err(unreachable)?;
    // The agent answers an ADD when the pod is captured, within its own timeout.
    let wait = config.timeout + Duration::from_secs(5);
    stream.set_read_timeout(Some(wait)).map_err(unreachable)?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut answer = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64)).read_until(b'\n', &mut answer).map_err(|err| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("no answer from the nodemesh agent at {socket}"),
            err.to_string(),
        )
    })?;
    serde_json::from_slice(&answer).map_err(|err| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("malformed answer from the nodemesh agent at {socket}"),
            err.to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), "abc".into()),
            ("CNI_NETNS".into(), "/var/run/netns/cni-1".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            (
                "CNI_ARGS".into(),
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1;K8S_POD_UID=u".into(),
            ),
        ])
    }

    fn config(socket: &str) -> Vec<u8> {
        json!({
            "cniVersion": "1.0.0", "name": "kindnet", "type": "nodemesh-cni",
            "agentSocket": socket, "timeoutSeconds": 2,
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1"}]}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn version_lists_what_it_supports() {
        let (_, out) = run(&env("VERSION"), b"");
        let out: Value = serde_json::from_str(&out.unwrap().unwrap()).unwrap();
        assert!(out["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")));
    }

    #[test]
    fn add_fails_closed_with_try_again_later_when_the_agent_is_down() {
        let (version, out) = run(&env("ADD"), &config("/nonexistent/nodemesh/cni.sock"));
        let err = out.unwrap_err();
        assert_eq!((version.as_deref(), err.code), (Some("1.0.0"), TRY_AGAIN_LATER));
        assert!(err.msg.contains("not reachable at /nonexistent/nodemesh/cni.sock"), "{err:?}");
    }

    #[test]
    fn del_and_exempt_namespaces_never_wait_for_the_agent() {
        assert!(run(&env("DEL"), &config("/nonexistent/cni.sock")).1.is_ok());
        let mut system = env("ADD");
        system.insert("CNI_ARGS".into(), "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns".into());
        let out = run(&system, &config("/nonexistent/cni.sock")).1.unwrap().unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["ips"][0]["address"], "10.244.1.7/24", "the previous result is passed on");
    }

    #[test]
    fn bad_config_and_environment_get_cni_errors_naming_the_problem() {
        /// (environment, stdin, expected code, text the message names).
        type Case = (HashMap<String, String>, Vec<u8>, u32, &'static str);
        let cases: [Case; 5] = [
            (env("ADD"), b"not json".to_vec(), DECODING_FAILURE, "not JSON"),
            (env("ADD"), br#"{"cniVersion": "9.9.9"}"#.to_vec(), INCOMPATIBLE_VERSION, "9.9.9"),
            (env("ADD"), br#"{"agentSocket": "relative.sock"}"#.to_vec(), INVALID_CONFIG, "absolute path"),
            (env("ADD"), br#"{"cniVersion": "1.0.0"}"#.to_vec(), INVALID_CONFIG, "prevResult"),
            (env("BOGUS"), config("/x"), INVALID_ENVIRONMENT, "BOGUS"),
        ];
        for (env, stdin, code, text) in cases {
            let err = run(&env, &stdin).1.unwrap_err();
            assert_eq!(err.code, code, "{err:?}");
            assert!(err.msg.contains(text), "{err:?} should mention {text}");
        }
    }

    #[test]
    fn the_pod_address_comes_from_the_main_plugins_result() {
        let result = json!({"ips": [{"address": "fd00::7/64"}, {"address": "10.244.1.7/24"}]});
        assert_eq!(first_ipv4(&result), Some(Ipv4Addr::new(10, 244, 1, 7)));
        assert_eq!(first_ipv4(&json!({"ips": []})), None);
    }
}
