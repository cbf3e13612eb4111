//! Kubernetes deployment: `braid deploy k8s` renders manifests that the Kubernetes API schemas
//! accept (kubernetes-validate, strict, against a pinned Kubernetes version), that say what they
//! should (images, probes, GPUs, secret references and never secret values, port 7070,
//! `/metrics`), and that read back through a YAML 1.1 parser as exactly what braid rendered; the
//! committed example is what the command renders today; the multi-GPU launcher starts, stops
//! and fails its workers together; the container build script builds the binaries; the Grafana
//! dashboard asks only for series the coordinator serves.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use braid::deploy::k8s::{render, JobFile, K8sOptions};
use braid_tests::{braid, workspace_root, BraidOutput};
use serde_json::{json, Value};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// The committed example and the arguments that render it (after the job file).
const EXAMPLE_DIR: &str = "deploy/k8s/example";
const EXAMPLE_JOB: &str = "examples/clip-vit-b-16.toml";
const EXAMPLE_ARGS: &[&str] = &["--gpus-per-worker", "8", "--pvc", "braid-data:/data", "--pvc", "braid-checkpoints:/checkpoints"];

/// The kinds the Kubernetes API schemas cover; the rest are checked here.
const CORE_KINDS: &[&str] = &["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Job"];

/// `braid deploy k8s JOB ARGS...`, run from the workspace root.
fn deploy(job: &str, args: &[&str]) -> BraidOutput {
    let root = workspace_root();
    let job = root.join(job);
    let mut all = vec![OsStr::new("deploy"), OsStr::new("k8s"), job.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    braid(all, Duration::from_secs(30))
}

/// Renders `job` with `args` into `dir`; panics with braid's output when it fails.
fn deploy_to(dir: &Path, job: &str, args: &[&str]) -> BraidOutput {
    let mut all = vec!["--out", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = deploy(job, &all);
    assert!(out.status.success(), "braid deploy k8s {job} {all:?} failed:\n{}", out.text());
    out
}

/// The `*.yaml` files of `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some(OsStr::new("yaml")))
        .collect();
    files.sort();
    files
}

/// Every YAML file of `dir` read with PyYAML (YAML 1.1, as strict about plain scalars as
/// anything Kubernetes tooling uses): file name -> its one document.
fn read_yaml_dir(dir: &Path) -> BTreeMap<String, Value> {
    let script = "import json, sys, yaml\n\
                  print(json.dumps({f: list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]}))";
    let files = yaml_files(dir);
    let mut args = vec!["-c".to_string(), script.to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed: BTreeMap<String, Vec<Value>> = serde_json::from_str(&braid_tests::python(&args)).expect("json from python");
    parsed
        .into_iter()
        .map(|(path, mut docs)| {
            assert_eq!(docs.len(), 1, "{path} holds {} documents, not one", docs.len());
            (Path::new(&path).file_name().unwrap().to_string_lossy().into_owned(), docs.remove(0))
        })
        .collect()
}

/// The venv's kubernetes-validate; panics when it is not installed.
fn kubernetes_validate() -> PathBuf {
    let bin = workspace_root().join(".venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing, so the manifests cannot be validated: run `scripts/setup.sh --test` \
         (kubernetes-validate is one of its TEST_PACKAGES)",
        bin.display()
    );
    bin
}

/// Runs kubernetes-validate, strict, against [`KUBERNETES_VERSION`] on `files`: (success, output).
fn run_kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Validates every file of `dir`: each core object must pass the schema of its kind; only the
/// ServiceMonitor (a CRD) and the kustomization may lack a schema, and are checked by
/// [`check_service_monitor`] and [`check_kustomization`] instead.
fn validate_dir(dir: &Path) {
    let files = yaml_files(dir);
    let (ok, output) = run_kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate rejected the manifests in {}:\n{output}", dir.display());
    let docs = read_yaml_dir(dir);
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file} has no kind"));
        let path = dir.join(file).display().to_string();
        if CORE_KINDS.contains(&kind) {
            let passed = format!(
                "INFO {path} passed for resource {}/{} against version 1.33",
                kind.to_lowercase(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            assert!(output.contains(&passed), "kubernetes-validate did not say `{passed}`:\n{output}");
        } else {
            assert!(["ServiceMonitor", "Kustomization"].contains(&kind), "{file}: unexpected kind {kind}");
            assert!(output.contains(&format!("WARN {path} Couldn't find schema for kind {kind}")), "{output}");
        }
    }
    assert!(!output.contains("ERROR"), "{output}");
    let kinds: BTreeSet<&str> = docs.values().filter_map(|d| d["kind"].as_str()).collect();
    for kind in CORE_KINDS {
        assert!(kinds.contains(kind), "{}: no {kind}", dir.display());
    }
    check_service_monitor(&docs);
    check_kustomization(&docs);
}

/// The ServiceMonitor against what the Prometheus Operator's CRD (monitoring.coreos.com/v1)
/// declares for the fields it uses, and against the Service it must select.
fn check_service_monitor(docs: &BTreeMap<String, Value>) {
    let Some(monitor) = docs.values().find(|d| d["kind"] == "ServiceMonitor") else { return };
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(monitor), ["apiVersion", "kind", "metadata", "spec"].map(String::from).into());
    assert_eq!(keys(&monitor["spec"]), ["endpoints", "selector"].map(String::from).into());
    let service = docs.values().find(|d| d["kind"] == "Service").expect("a Service");
    assert_eq!(monitor["spec"]["selector"], json!({"matchLabels": service["metadata"]["labels"]}), "the ServiceMonitor misses the Service");
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert!(keys(endpoint).is_subset(&["port", "path", "scheme", "interval"].map(String::from).into()), "{endpoint}");
    assert_eq!(endpoint["path"], "/metrics");
    assert!(["http", "https"].contains(&endpoint["scheme"].as_str().unwrap()));
    let interval = endpoint["interval"].as_str().unwrap();
    assert!(interval.ends_with('s') && interval[..interval.len() - 1].parse::<u32>().is_ok(), "interval {interval:?}");
    let port = endpoint["port"].as_str().unwrap();
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == port && p["port"] == 7070), "the Service has no port {port:?} on 7070: {ports:?}");
}

/// The kustomization lists every other file once.
fn check_kustomization(docs: &BTreeMap<String, Value>) {
    let kustomization = &docs["kustomization.yaml"];
    assert_eq!(kustomization["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    let listed: BTreeSet<&str> = kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    let files: BTreeSet<&str> = docs.keys().map(String::as_str).filter(|f| *f != "kustomization.yaml").collect();
    assert_eq!(listed, files);
}

fn first_container(doc: &Value) -> &Value {
    &doc["spec"]["template"]["spec"]["containers"][0]
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    let all = container["env"].as_array().expect("env");
    all.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no env {name} in {all:?}"))
}

#[test]
fn committed_example_is_what_the_command_renders() {
    let dir = tempfile::tempdir().unwrap();
    deploy_to(dir.path(), EXAMPLE_JOB, EXAMPLE_ARGS);
    let root = workspace_root();
    let committed = root.join(EXAMPLE_DIR);
    let again = format!("braid deploy k8s {EXAMPLE_JOB} --out {EXAMPLE_DIR} --force {}", EXAMPLE_ARGS.join(" "));
    let names = |dir: &Path| yaml_files(dir).iter().map(|f| f.file_name().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(&committed), names(dir.path()), "{EXAMPLE_DIR} holds other files than the command renders: run `{again}`");
    for file in yaml_files(dir.path()) {
        let name = file.file_name().unwrap();
        let rendered = std::fs::read_to_string(&file).unwrap();
        let kept = std::fs::read_to_string(committed.join(name)).unwrap();
        assert!(kept == rendered, "{EXAMPLE_DIR}/{} is stale: run `{again}`", name.to_string_lossy());
    }
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let root = workspace_root();
    validate_dir(&root.join(EXAMPLE_DIR));
    let dir = tempfile::tempdir().unwrap();
    let renderings: [(&str, &str, &[&str]); 3] = [
        ("cpu", "examples/clip-tiny.toml", &[]),
        ("gpu", EXAMPLE_JOB, &["--workers", "16", "--namespace", "ml-team", "--pvc", "braid-data:/data"]),
        ("gpu-pods", EXAMPLE_JOB, &["--gpus-per-worker", "4", "--no-service-monitor"]),
    ];
    for (name, job, args) in renderings {
        let out_dir = dir.path().join(name);
        deploy_to(&out_dir, job, args);
        validate_dir(&out_dir);
    }
    assert!(!dir.path().join("gpu-pods/servicemonitor.yaml").exists());

    // The validator is not a rubber stamp: a wrong type and an unknown field are errors.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let deployment = std::fs::read_to_string(root.join(EXAMPLE_DIR).join("coordinator-deployment.yaml")).unwrap();
    std::fs::write(broken.join("type.yaml"), deployment.replace("replicas: 1", "replicas: one")).unwrap();
    std::fs::write(broken.join("field.yaml"), deployment.replace("  replicas: 1", "  replicas: 1\n  replica: 1")).unwrap();
    for file in ["type.yaml", "field.yaml"] {
        let (ok, output) = run_kubernetes_validate(&[broken.join(file)]);
        assert!(!ok && output.contains("ERROR"), "kubernetes-validate accepted {file}:\n{output}");
    }
}

#[test]
fn manifests_read_back_as_rendered_and_say_what_they_should() {
    let dir = tempfile::tempdir().unwrap();
    // Secrets in the environment of the command must not leak into what it writes.
    let job_text = std::fs::read_to_string(workspace_root().join(EXAMPLE_JOB))
        .unwrap()
        .replace("/data/laion-subset/manifest.json", "s3://laion/subset/manifest.json")
        .replace("/checkpoints/clip-vit-b-16", "az://runs/clip-vit-b-16");
    let job_path = dir.path().join("job.toml");
    std::fs::write(&job_path, &job_text).unwrap();
    let out_dir = dir.path().join("out");
    let args = [
        "deploy",
        "k8s",
        job_path.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--image-coordinator",
        "registry.example.com/braid-coordinator:1.2",
        "--image-worker",
        "registry.example.com/braid-worker:1.2",
        "--namespace",
        "ml",
        "--gpus-per-worker",
        "2",
    ];
    let out = Command::new(braid_tests::braid_bin())
        .args(args)
        .env("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
        .env("BRAID_AUTH_TOKEN", "token-value-456")
        .env("AZURE_STORAGE_ACCOUNT_KEY", "azure-key-value-789")
        .output()
        .unwrap();
    assert!(out.status.success(), "braid deploy k8s failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("warning"), "object-store locations need no volume:\n{stderr}");

    // PyYAML reads back exactly the objects braid built.
    let docs = read_yaml_dir(&out_dir);
    let job = JobFile::parse(&job_text, "job").unwrap();
    let options = K8sOptions {
        image_coordinator: "registry.example.com/braid-coordinator:1.2".into(),
        image_worker: "registry.example.com/braid-worker:1.2".into(),
        namespace: Some("ml".into()),
        gpus_per_worker: 2,
        ..K8sOptions::default()
    };
    let rendering = render(&job, &options).unwrap();
    assert_eq!(docs.len(), rendering.documents.len());
    for document in &rendering.documents {
        assert_eq!(docs[&document.file], document.value, "{} does not read back as rendered", document.file);
    }

    for (file, doc) in &docs {
        if file != "kustomization.yaml" {
            assert_eq!(doc["metadata"]["namespace"], "ml", "{file}");
        }
    }
    let all_text: String = yaml_files(&out_dir).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    for secret in ["aws-secret-value-123", "token-value-456", "azure-key-value-789"] {
        assert!(!all_text.contains(secret), "a secret value from the environment is in the manifests");
    }
    assert!(docs.values().all(|d| d["kind"] != "Secret"), "the manifests must not carry Secrets");

    let coordinator = first_container(&docs["coordinator-deployment.yaml"]);
    assert_eq!(coordinator["image"], "registry.example.com/braid-coordinator:1.2");
    let mut command: Vec<&str> = coordinator["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    command.extend(coordinator["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()));
    assert_eq!(command, ["braid-coordinator", "--job", "/etc/braid/job.toml", "--listen", "0.0.0.0:7070"]);
    assert_eq!(coordinator["ports"], json!([{"name": "grpc", "containerPort": 7070, "protocol": "TCP"}]));
    assert_eq!(coordinator["readinessProbe"]["grpc"], json!({"port": 7070, "service": "braid.v1.Coordinator"}));
    assert_eq!(coordinator["livenessProbe"]["grpc"], json!({"port": 7070}));
    assert!(coordinator["resources"]["requests"]["cpu"].is_string() && coordinator["resources"]["limits"]["memory"].is_string());
    let config_map = &docs["configmap.yaml"];
    assert_eq!(config_map["data"]["job.toml"], job_text.as_str(), "the ConfigMap's job file differs from the job file");
    let volumes = &docs["coordinator-deployment.yaml"]["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["configMap"]["name"], config_map["metadata"]["name"]);

    let worker_job = &docs["worker-job.yaml"];
    assert_eq!(worker_job["spec"]["completionMode"], "Indexed");
    assert_eq!((&worker_job["spec"]["completions"], &worker_job["spec"]["parallelism"]), (&json!(4), &json!(4)));
    assert_eq!(worker_job["spec"]["backoffLimit"], job.config.cluster.max_restarts);
    let worker = first_container(worker_job);
    assert_eq!(worker["image"], "registry.example.com/braid-worker:1.2");
    for requirement in ["requests", "limits"] {
        assert_eq!(worker["resources"][requirement]["nvidia.com/gpu"], "2", "{requirement}");
    }
    assert_eq!(env(worker, "BRAID_COORDINATOR")["value"], "clip-vit-b-16-coordinator:7070");
    assert_eq!(env(worker, "BRAID_ADVERTISE_HOST")["valueFrom"], json!({"fieldRef": {"fieldPath": "status.podIP"}}));
    assert_eq!(env(worker, "BRAID_GPUS_PER_POD")["value"], "2");

    for (file, container) in [("coordinator", coordinator), ("worker", worker)] {
        let reference = |var: &str| env(container, var)["valueFrom"]["secretKeyRef"].clone();
        assert_eq!(reference("BRAID_AUTH_TOKEN"), json!({"name": "braid-auth", "key": "token", "optional": true}), "{file}");
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"] {
            assert_eq!(reference(var), json!({"name": "braid-object-store", "key": var, "optional": true}), "{file}: {var}");
        }
        for variable in container["env"].as_array().unwrap() {
            let name = variable["name"].as_str().unwrap();
            if ["TOKEN", "SECRET", "KEY", "PASSWORD", "CREDENTIALS"].iter().any(|s| name.contains(s)) {
                assert!(variable.get("value").is_none(), "{file}: {name} has a value");
                assert!(variable["valueFrom"].get("secretKeyRef").is_some(), "{file}: {name} is not a Secret reference");
            }
        }
    }
    let monitor = &docs["servicemonitor.yaml"];
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "grpc");
    check_service_monitor(&docs);
    assert_eq!(docs["coordinator-pdb.yaml"]["spec"]["maxUnavailable"], 0);
}

#[test]
fn stdout_stream_holds_every_object_but_the_kustomization() {
    let out = deploy("examples/clip-tiny.toml", &[]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stderr.contains("warning: data.train = \"../data/synth/train/manifest.json\" is a relative path"), "{}", out.text());
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("stream.yaml");
    std::fs::write(&stream, &out.stdout).unwrap();
    let script = "import json, sys, yaml\nprint(json.dumps([d['kind'] for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let kinds: Vec<String> = serde_json::from_str(&braid_tests::python(&["-c", script, stream.to_str().unwrap()])).unwrap();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Job", "ServiceMonitor"]);
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad_job = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(workspace_root().join("examples/clip-tiny.toml")).unwrap();
    std::fs::write(&bad_job, text.replace("global_batch = 128", "global_batch = 0")).unwrap();
    let out = deploy(bad_job.to_str().unwrap(), &[]);
    assert!(!out.status.success(), "{}", out.text());
    assert!(out.stderr.contains("train.global_batch = 0") && out.stderr.contains("bad.toml"), "{}", out.text());
    assert!(out.stdout.is_empty(), "manifests for an invalid job:\n{}", out.stdout);

    let cases: [(&[&str], &str); 4] = [
        (&["--gpus-per-worker", "2"], "--gpus-per-worker = 2: the job runs on cluster.device = \"cpu\""),
        (&["--workers", "0"], "--workers = 0"),
        (&["--pvc", "data"], "--pvc = data: use CLAIM:PATH"),
        (&["--namespace", "ML"], "--namespace \"ML\""),
    ];
    for (args, message) in cases {
        let out = deploy("examples/clip-tiny.toml", args);
        assert!(!out.status.success(), "{args:?} was accepted:\n{}", out.text());
        assert!(out.stderr.contains(message), "{args:?}: stderr does not say {message:?}:\n{}", out.text());
    }

    // An output folder whose files differ is left alone unless --force; identical files are fine.
    let out_dir = dir.path().join("out");
    deploy_to(&out_dir, "examples/clip-tiny.toml", &[]);
    deploy_to(&out_dir, "examples/clip-tiny.toml", &[]);
    let edited = out_dir.join("worker-job.yaml");
    std::fs::write(&edited, "# edited by hand\n").unwrap();
    let before = std::fs::read_to_string(out_dir.join("configmap.yaml")).unwrap();
    let out = deploy("examples/clip-tiny.toml", &["--out", out_dir.to_str().unwrap(), "--workers", "4"]);
    assert!(!out.status.success(), "overwrote edited files:\n{}", out.text());
    for expected in ["refusing to overwrite", "configmap.yaml", "worker-job.yaml", "--force"] {
        assert!(out.stderr.contains(expected), "stderr does not say {expected:?}:\n{}", out.text());
    }
    assert_eq!(std::fs::read_to_string(&edited).unwrap(), "# edited by hand\n");
    assert_eq!(std::fs::read_to_string(out_dir.join("configmap.yaml")).unwrap(), before, "a refused rendering changed a file");
    deploy_to(&out_dir, "examples/clip-tiny.toml", &["--workers", "4", "--force"]);
    assert!(std::fs::read_to_string(&edited).unwrap().contains("completions: 4"));
}

/// A stand-in for `braid` that logs its arguments and acts as `FAKE_MODE` says.
const FAKE_BRAID: &str = r#"#!/usr/bin/env bash
device=$3
echo "start $*" >> "$FAKE_LOG"
case "$FAKE_MODE" in
  finish) sleep 0.2; exit 0 ;;
  fail-one) if [[ $device == cuda:1 ]]; then sleep 0.5; exit 3; fi; exec sleep 60 ;;
  stop) trap 'echo "stopped $device" >> "$FAKE_LOG"; exit 0' TERM; while true; do sleep 0.05; done ;;
esac
"#;

/// Runs the multi-GPU launcher of a rendered 3-GPU worker pod with a fake `braid` in `mode`;
/// `signal_after_start` sends SIGTERM once all three workers started. Returns (exit code, log).
fn run_launcher(mode: &str, signal_after_start: bool) -> (Option<i32>, String, Duration) {
    let job = JobFile::parse(&std::fs::read_to_string(workspace_root().join(EXAMPLE_JOB)).unwrap(), "job").unwrap();
    let options = K8sOptions { workers: Some(3), gpus_per_worker: 3, ..K8sOptions::default() };
    let rendering = render(&job, &options).unwrap();
    let worker_job = &rendering.documents.iter().find(|d| d.file == "worker-job.yaml").unwrap().value;
    let container = first_container(worker_job);
    let command: Vec<String> = container["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(command[..2], ["bash", "-c"]);

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("braid");
    std::fs::write(&fake, FAKE_BRAID).unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let log = dir.path().join("log");
    std::fs::write(&log, "").unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let started = Instant::now();
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .env("PATH", path)
        .env("BRAID_GPUS_PER_POD", env(container, "BRAID_GPUS_PER_POD")["value"].as_str().unwrap())
        .env("FAKE_LOG", &log)
        .env("FAKE_MODE", mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap();
    if signal_after_start {
        while read_log().lines().filter(|l| l.starts_with("start")).count() < 3 {
            assert!(started.elapsed() < Duration::from_secs(10), "the workers did not start:\n{}", read_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the launcher ({mode}) still runs after 20 s:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), read_log(), started.elapsed())
}

#[test]
fn multi_gpu_launcher_runs_one_worker_per_gpu() {
    let (code, log, _) = run_launcher("finish", false);
    assert_eq!(code, Some(0), "{log}");
    let mut started: Vec<&str> = log.lines().collect();
    started.sort();
    let expected: Vec<String> =
        (0..3).map(|i| format!("start worker --device cuda:{i} --connect-timeout 600")).collect();
    assert_eq!(started, expected);
}

#[test]
fn multi_gpu_launcher_passes_sigterm_to_every_worker() {
    let (code, log, _) = run_launcher("stop", true);
    assert_eq!(code, Some(0), "{log}");
    let stopped: BTreeSet<&str> = log.lines().filter(|l| l.starts_with("stopped")).collect();
    assert_eq!(stopped, ["stopped cuda:0", "stopped cuda:1", "stopped cuda:2"].into(), "{log}");
}

#[test]
fn multi_gpu_launcher_stops_the_pod_when_one_worker_fails() {
    let (code, log, elapsed) = run_launcher("fail-one", false);
    assert_eq!(code, Some(3), "the pod must fail with the failed worker's status:\n{log}");
    assert!(elapsed < Duration::from_secs(10), "the other workers were not stopped: {elapsed:?}\n{log}");
}

/// Runs `deploy/docker/build.sh target`; returns the binary it names on its last stdout line.
fn docker_build_script(target: &str) -> PathBuf {
    let root = workspace_root();
    let started = Instant::now();
    let out = Command::new(root.join("deploy/docker/build.sh")).arg(target).current_dir(&root).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/docker/build.sh {target} failed:\n{stderr}");
    println!("deploy/docker/build.sh {target}: {:.1} s", started.elapsed().as_secs_f64());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let binary = PathBuf::from(stdout.lines().last().unwrap_or_else(|| panic!("build.sh {target} printed no path:\n{stderr}")));
    assert!(binary.is_file(), "build.sh {target} names {}, which does not exist", binary.display());
    binary
}

#[test]
fn docker_build_script_builds_both_binaries() {
    let version = env!("CARGO_PKG_VERSION");
    for (target, name, help) in [("coordinator", "braid-coordinator", "--job"), ("worker", "braid", "deploy")] {
        let binary = docker_build_script(target);
        assert_eq!(binary, workspace_root().join("target/release").join(name));
        let out = Command::new(&binary).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name} --version failed");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{name} {version}"));
        let out = Command::new(&binary).arg("--help").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(help), "{name} --help:\n{text}");
    }
    let out = Command::new(workspace_root().join("deploy/docker/build.sh")).arg("images").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

/// The series the coordinator serves at `/metrics`, every one labelled `job_name`.
const SERIES: &[&str] = &[
    "braid_step",
    "braid_total_steps",
    "braid_samples_per_second",
    "braid_loss",
    "braid_loss_term",
    "braid_learning_rate",
    "braid_grad_norm",
    "braid_world_size",
    "braid_generation",
    "braid_rejoins_total",
    "braid_generations_total",
    "braid_checkpoints_total",
    "braid_checkpoint_seconds",
    "braid_checkpoint_bytes",
    "braid_data_wait_seconds",
    "braid_rank_step_seconds",
    "braid_rank_collective_wait_seconds",
    "braid_rank_straggler",
    "braid_rank_device_memory_bytes",
    "braid_rank_device_memory_peak_bytes",
    "braid_corrupt_samples_total",
    "braid_replica_drifts_total",
    "braid_job_finished",
    "braid_job_failed",
];

/// PromQL functions, aggregations and keywords the dashboard may use, and the labels it may
/// group by.
const PROMQL_WORDS: &[&str] = &[
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "rate", "increase", "delta", "deriv",
    "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "changes", "resets",
    "topk", "bottomk", "sort_desc", "and", "or", "unless", "offset", "job_name", "rank", "worker", "objective",
];

/// The identifiers of a PromQL expression outside label matchers, ranges and strings.
fn promql_identifiers(expr: &str) -> Vec<String> {
    let mut outside = String::new();
    let mut depth_braces = 0;
    let mut depth_brackets = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => depth_brackets += 1,
            ']' => depth_brackets -= 1,
            _ if depth_braces == 0 && depth_brackets == 0 => outside.push(c),
            _ => {}
        }
        if !in_string && (depth_braces > 0 || depth_brackets > 0) {
            outside.push(' ');
        }
    }
    outside
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .map(String::from)
        .collect()
}

/// Every `expr` under `value`.
fn exprs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => exprs(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, found)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_asks_only_for_coordinator_series() {
    let path = workspace_root().join("deploy/grafana/braid-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "panel {} has no position", panel["title"]);
    }
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    assert!(!found.is_empty(), "no PromQL in the dashboard");
    let mut used = BTreeSet::new();
    for expr in &found {
        for word in promql_identifiers(expr) {
            if word.starts_with("braid_") {
                assert!(SERIES.contains(&word.as_str()), "{expr:?} asks for {word}, which the coordinator does not serve");
                used.insert(word);
            } else {
                assert!(PROMQL_WORDS.contains(&word.as_str()), "{expr:?}: unexpected identifier {word:?}");
            }
        }
        let matches_job = expr.contains("job_name=~\"$job_name\"") || expr.starts_with("label_values(");
        assert!(matches_job, "{expr:?} does not select the dashboard's job");
    }
    let unused: Vec<&&str> = SERIES.iter().filter(|s| !used.contains(**s)).collect();
    assert!(unused.is_empty(), "series without a panel: {unused:?}");
}
