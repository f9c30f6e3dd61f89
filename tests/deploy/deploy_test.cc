// Checks of deploy/ against the code it deploys:
//   - every YAML file under deploy/k8s parses, has an expected apiVersion/kind, and is used by a
//     kustomization;
//   - each overlay, rendered the way kustomize renders it (for the kustomize features the manifests
//     use: resources, strategic-merge patches, configMapGenerator, images, namespace, labels), is
//     consistent: selectors, ports, volumes, HPA targets, container flags that exist in the
//     binaries (`--helpfull`), a policy that passes `kvgate policy check`, and `dns:` pools that
//     name a headless Service whose Deployment runs the pool's KV format on the pool's port;
//   - the CPU overlay's workers and gateway, started from the build with the rendered arguments on
//     loopback, route as the policy says; every metric name (and label) used by the Grafana
//     dashboard, the Prometheus rules, the adapter rules and the HPAs exists in their /metrics.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvgate/v1/gateway.grpc.pb.h"
#include "tests/support/test_env.h"

namespace kvgate {
namespace {

namespace fs = std::filesystem;
namespace pb = ::kvgate::v1;
using ::kvgate::testing::Subprocess;

// ---- Small utilities
// -----------------------------------------------------------------------------

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

fs::path DeployDir() { return fs::path(testing::SourceDir()) / "deploy"; }

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// Runs a shell command line; returns its exit code and combined output.
CommandResult RunCommand(const std::string& command_line) {
  CommandResult result;
  FILE* pipe = popen((command_line + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// Flag names a binary accepts, from its `--helpfull` listing ("    --name (help); default: ...").
std::set<std::string> FlagsOf(const std::string& binary) {
  static std::map<std::string, std::set<std::string>> cache;
  if (auto it = cache.find(binary); it != cache.end()) return it->second;
  CommandResult help = RunCommand(testing::BinaryDir() + "/bin/" + binary + " --helpfull");
  std::set<std::string> flags;
  static const std::regex kFlagLine(R"(^\s+--([A-Za-z0-9_]+) \()");
  std::istringstream lines(help.output);
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (std::regex_search(line, m, kFlagLine)) flags.insert(m[1]);
  }
  cache[binary] = flags;
  return flags;
}

std::vector<YAML::Node> LoadDocuments(const fs::path& path) {
  std::vector<YAML::Node> docs;
  for (const YAML::Node& doc : YAML::LoadAllFromFile(path.string())) {
    if (doc.IsDefined() && !doc.IsNull()) docs.push_back(YAML::Clone(doc));
  }
  return docs;
}

std::string Str(const YAML::Node& node) {
  return node.IsDefined() && node.IsScalar() ? node.as<std::string>() : "";
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---- A kustomize subset
// --------------------------------------------------------------------------

// The merge key of a list field in a strategic-merge patch (as Kubernetes' types declare it), or
// "" for lists that a patch replaces as a whole (args, command, tolerations, ...).
std::string MergeKey(const std::string& field) {
  if (field == "containers" || field == "initContainers" || field == "volumes" || field == "env") {
    return "name";
  }
  if (field == "ports") return "containerPort";
  if (field == "volumeMounts") return "mountPath";
  return "";
}

void StrategicMerge(YAML::Node target, const YAML::Node& patch) {
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    const std::string key = it->first.as<std::string>();
    const YAML::Node value = it->second;
    YAML::Node existing = target[key];
    if (value.IsMap() && existing.IsDefined() && existing.IsMap()) {
      StrategicMerge(existing, value);
      continue;
    }
    const std::string merge_key = MergeKey(key);
    if (value.IsSequence() && existing.IsDefined() && existing.IsSequence() && !merge_key.empty()) {
      for (const YAML::Node& item : value) {
        bool merged = false;
        for (YAML::Node current : existing) {
          if (Str(current[merge_key]) == Str(item[merge_key])) {
            StrategicMerge(current, item);
            merged = true;
            break;
          }
        }
        if (!merged) existing.push_back(YAML::Clone(item));
      }
      continue;
    }
    target[key] = YAML::Clone(value);
  }
}

struct Rendered {
  std::vector<YAML::Node> objects;
  // ConfigMap name -> data key -> the file it was generated from.
  std::map<std::string, std::map<std::string, fs::path>> generated_files;
  std::set<fs::path> files_used;
  std::vector<std::string> errors;

  YAML::Node Find(const std::string& kind, const std::string& name) const {
    for (const YAML::Node& o : objects) {
      if (Str(o["kind"]) == kind && Str(o["metadata"]["name"]) == name) return o;
    }
    return YAML::Node(YAML::NodeType::Undefined);
  }
  std::vector<YAML::Node> All(const std::string& kind) const {
    std::vector<YAML::Node> out;
    for (const YAML::Node& o : objects) {
      if (Str(o["kind"]) == kind) out.push_back(o);
    }
    return out;
  }
};

void Render(const fs::path& dir, Rendered& out) {
  const fs::path kfile = dir / "kustomization.yaml";
  out.files_used.insert(fs::weakly_canonical(kfile));
  YAML::Node k;
  try {
    k = YAML::LoadFile(kfile.string());
  } catch (const YAML::Exception& e) {
    out.errors.push_back(kfile.string() + ": " + e.what());
    return;
  }
  std::vector<YAML::Node> objects;
  for (const YAML::Node& r : k["resources"]) {
    const fs::path path = dir / r.as<std::string>();
    if (fs::is_directory(path)) {
      Rendered sub;
      Render(path, sub);
      objects.insert(objects.end(), sub.objects.begin(), sub.objects.end());
      out.generated_files.insert(sub.generated_files.begin(), sub.generated_files.end());
      out.files_used.insert(sub.files_used.begin(), sub.files_used.end());
      out.errors.insert(out.errors.end(), sub.errors.begin(), sub.errors.end());
    } else {
      out.files_used.insert(fs::weakly_canonical(path));
      for (YAML::Node& doc : LoadDocuments(path)) objects.push_back(doc);
    }
  }
  for (const YAML::Node& gen : k["configMapGenerator"]) {
    const std::string name = Str(gen["name"]);
    YAML::Node cm;
    cm["apiVersion"] = "v1";
    cm["kind"] = "ConfigMap";
    cm["metadata"]["name"] = name;
    const YAML::Node generator_labels = gen["options"]["labels"];
    for (auto it = generator_labels.begin(); it != generator_labels.end(); ++it) {
      cm["metadata"]["labels"][it->first.as<std::string>()] = it->second.as<std::string>();
    }
    for (const YAML::Node& f : gen["files"]) {
      std::string spec = f.as<std::string>();
      std::string key = fs::path(spec).filename().string();
      if (auto eq = spec.find('='); eq != std::string::npos) {
        key = spec.substr(0, eq);
        spec = spec.substr(eq + 1);
      }
      const fs::path path = dir / spec;
      out.files_used.insert(fs::weakly_canonical(path));
      out.generated_files[name][key] = path;
      cm["data"][key] = ReadFile(path);
    }
    objects.push_back(cm);
  }
  for (const YAML::Node& p : k["patches"]) {
    const fs::path path = dir / Str(p["path"]);
    out.files_used.insert(fs::weakly_canonical(path));
    for (const YAML::Node& patch : LoadDocuments(path)) {
      bool applied = false;
      for (YAML::Node& o : objects) {
        if (Str(o["kind"]) == Str(patch["kind"]) &&
            Str(o["metadata"]["name"]) == Str(patch["metadata"]["name"])) {
          StrategicMerge(o, patch);
          applied = true;
        }
      }
      if (!applied) {
        out.errors.push_back(path.string() + ": patch targets " + Str(patch["kind"]) + "/" +
                             Str(patch["metadata"]["name"]) + ", which the resources lack");
      }
    }
  }
  for (const YAML::Node& image : k["images"]) {
    for (YAML::Node& o : objects) {
      if (Str(o["kind"]) != "Deployment") continue;
      for (YAML::Node c : o["spec"]["template"]["spec"]["containers"]) {
        std::string current = Str(c["image"]);
        if (current.substr(0, current.find(':')) == Str(image["name"])) {
          c["image"] = Str(image["newName"]) + ":" + Str(image["newTag"]);
        }
      }
    }
  }
  for (YAML::Node& o : objects) {
    if (k["namespace"] && Str(o["kind"]) != "Namespace") {
      o["metadata"]["namespace"] = Str(k["namespace"]);
    }
    for (const YAML::Node& l : k["labels"]) {
      for (auto it = l["pairs"].begin(); it != l["pairs"].end(); ++it) {
        o["metadata"]["labels"][it->first.as<std::string>()] = it->second.as<std::string>();
      }
    }
  }
  std::set<std::string> ids;
  for (const YAML::Node& o : objects) {
    std::string id = Str(o["kind"]) + "/" + Str(o["metadata"]["name"]);
    if (!ids.insert(id).second) out.errors.push_back(dir.string() + ": duplicate object " + id);
  }
  out.objects.insert(out.objects.end(), objects.begin(), objects.end());
}

Rendered RenderOverlay(const std::string& name) {
  Rendered r;
  Render(DeployDir() / "k8s" / "overlays" / name, r);
  return r;
}

// --name=value arguments of a container, by name. Records a failure for any other form.
std::map<std::string, std::string> ArgsOf(const YAML::Node& container) {
  std::map<std::string, std::string> args;
  for (const YAML::Node& a : container["args"]) {
    const std::string arg = a.as<std::string>();
    auto eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      ADD_FAILURE() << "container " << Str(container["name"]) << ": argument '" << arg
                    << "' is not of the form --flag=value";
      continue;
    }
    args[arg.substr(2, eq - 2)] = arg.substr(eq + 1);
  }
  return args;
}

bool LabelsMatch(const YAML::Node& selector, const YAML::Node& labels) {
  if (!selector.IsMap() || selector.size() == 0) return false;
  for (auto it = selector.begin(); it != selector.end(); ++it) {
    if (Str(labels[it->first.as<std::string>()]) != it->second.as<std::string>()) return false;
  }
  return true;
}

// The Deployment whose pod template a Service selects (undefined if none).
YAML::Node DeploymentOf(const Rendered& r, const YAML::Node& service) {
  for (const YAML::Node& d : r.All("Deployment")) {
    if (LabelsMatch(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])) {
      return d;
    }
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

YAML::Node ContainerOf(const YAML::Node& deployment, const std::string& binary) {
  for (const YAML::Node& c : deployment["spec"]["template"]["spec"]["containers"]) {
    if (c["command"].IsSequence() && c["command"].size() > 0 &&
        c["command"][0].as<std::string>() == binary) {
      return c;
    }
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

// ---- Static checks
// -------------------------------------------------------------------------------

const std::map<std::string, std::string>& ExpectedApiVersions() {
  static const auto* kinds = new std::map<std::string, std::string>{
      {"Kustomization", "kustomize.config.k8s.io/v1beta1"},
      {"Namespace", "v1"},
      {"Service", "v1"},
      {"ConfigMap", "v1"},
      {"PersistentVolumeClaim", "v1"},
      {"Deployment", "apps/v1"},
      {"HorizontalPodAutoscaler", "autoscaling/v2"},
      {"PodMonitor", "monitoring.coreos.com/v1"},
      {"ServiceMonitor", "monitoring.coreos.com/v1"},
      {"PrometheusRule", "monitoring.coreos.com/v1"},
  };
  return *kinds;
}

const std::vector<std::string>& Kustomizations() {
  static const auto* dirs =
      new std::vector<std::string>{"overlays/cpu", "overlays/gpu", "monitoring", "base"};
  return *dirs;
}

TEST(DeployManifests, EveryYamlParsesWithAnExpectedKindAndIsUsed) {
  std::set<fs::path> used;
  for (const std::string& dir : Kustomizations()) {
    Rendered r;
    Render(DeployDir() / "k8s" / dir, r);
    for (const auto& e : r.errors) ADD_FAILURE() << e;
    used.insert(r.files_used.begin(), r.files_used.end());
  }
  std::set<fs::path> generator_sources;
  for (const char* overlay : {"cpu", "gpu"}) {
    for (const auto& [name, files] : RenderOverlay(overlay).generated_files) {
      for (const auto& [key, path] : files) generator_sources.insert(fs::weakly_canonical(path));
    }
  }
  int files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(DeployDir() / "k8s")) {
    const std::string ext = entry.path().extension().string();
    if (ext != ".yaml" && ext != ".yml") continue;
    ++files;
    const fs::path path = fs::weakly_canonical(entry.path());
    SCOPED_TRACE(path.string());
    EXPECT_TRUE(used.count(path)) << "not used by any kustomization";
    std::vector<YAML::Node> docs;
    try {
      docs = LoadDocuments(path);
    } catch (const YAML::Exception& e) {
      ADD_FAILURE() << "YAML error: " << e.what();
      continue;
    }
    EXPECT_FALSE(docs.empty());
    if (generator_sources.count(path)) continue;  // a policy file, checked by the policy tests
    for (const YAML::Node& doc : docs) {
      const std::string kind = Str(doc["kind"]);
      auto expected = ExpectedApiVersions().find(kind);
      if (expected == ExpectedApiVersions().end()) {
        ADD_FAILURE() << "unexpected kind '" << kind << "'";
        continue;
      }
      EXPECT_EQ(Str(doc["apiVersion"]), expected->second) << kind;
      if (kind != "Kustomization") {
        EXPECT_FALSE(Str(doc["metadata"]["name"]).empty()) << kind << " without a name";
      }
    }
  }
  EXPECT_GE(files, 15);
}

class OverlayTest : public ::testing::TestWithParam<std::string> {};

TEST_P(OverlayTest, ObjectsReferToEachOther) {
  Rendered r = RenderOverlay(GetParam());
  for (const auto& e : r.errors) ADD_FAILURE() << e;
  ASSERT_FALSE(r.All("Deployment").empty());
  for (const YAML::Node& o : r.objects) {
    const YAML::Node labels = o["metadata"]["labels"];
    EXPECT_TRUE(labels.IsDefined() && labels.IsMap() &&
                Str(labels["app.kubernetes.io/part-of"]) == "kvgate")
        << Str(o["kind"]) << "/" << Str(o["metadata"]["name"]) << " lacks part-of: kvgate";
    if (Str(o["kind"]) != "Namespace") {
      EXPECT_EQ(Str(o["metadata"]["namespace"]), "kvgate") << Str(o["metadata"]["name"]);
    }
  }
  for (const YAML::Node& d : r.All("Deployment")) {
    const std::string name = Str(d["metadata"]["name"]);
    SCOPED_TRACE("Deployment " + name);
    const YAML::Node pod = d["spec"]["template"]["spec"];
    EXPECT_TRUE(LabelsMatch(d["spec"]["selector"]["matchLabels"],
                            d["spec"]["template"]["metadata"]["labels"]));
    std::set<std::string> volumes;
    for (const YAML::Node& v : pod["volumes"]) {
      volumes.insert(Str(v["name"]));
      if (v["configMap"]) {
        EXPECT_TRUE(r.Find("ConfigMap", Str(v["configMap"]["name"])))
            << "volume " << Str(v["name"]) << " names a ConfigMap the overlay does not make";
      }
      if (v["persistentVolumeClaim"]) {
        EXPECT_TRUE(r.Find("PersistentVolumeClaim", Str(v["persistentVolumeClaim"]["claimName"])));
      }
    }
    for (const YAML::Node& c : pod["containers"]) {
      SCOPED_TRACE("container " + Str(c["name"]));
      ASSERT_TRUE(c["command"].IsSequence());
      const std::string binary = c["command"][0].as<std::string>();
      ASSERT_TRUE(binary == "kvgate-gateway" || binary == "kvgate-worker") << binary;
      const std::set<std::string> flags = FlagsOf(binary);
      ASSERT_GT(flags.size(), 5u) << binary << " --helpfull listed no flags";
      for (const auto& [flag, value] : ArgsOf(c)) {
        EXPECT_TRUE(flags.count(flag)) << binary << " has no flag --" << flag;
      }
      std::map<std::string, int> ports;
      for (const YAML::Node& p : c["ports"]) ports[Str(p["name"])] = p["containerPort"].as<int>();
      auto args = ArgsOf(c);
      EXPECT_EQ(std::to_string(ports["grpc"]), args["port"]) << "grpc containerPort vs --port";
      for (const char* probe : {"readinessProbe", "livenessProbe", "startupProbe"}) {
        const YAML::Node p = c[probe];
        if (!p) continue;
        if (p["httpGet"]) {
          EXPECT_TRUE(ports.count(Str(p["httpGet"]["port"]))) << probe;
        }
        if (p["grpc"]) {
          EXPECT_EQ(p["grpc"]["port"].as<int>(), ports["grpc"]) << probe;
        }
      }
      for (const YAML::Node& m : c["volumeMounts"]) {
        EXPECT_TRUE(volumes.count(Str(m["name"]))) << "mount of unknown volume " << Str(m["name"]);
        EXPECT_FALSE(m["subPath"]) << "subPath mounts never see ConfigMap updates";
      }
      EXPECT_FALSE(Str(c["image"]).empty());
      if (binary == "kvgate-worker") {
        ASSERT_TRUE(c["readinessProbe"]["grpc"]) << "workers use the native gRPC probe";
        ASSERT_TRUE(c["startupProbe"]["grpc"]);
        EXPECT_EQ(args["metrics_port"],
                  d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
                      .as<std::string>());
      } else {
        EXPECT_EQ(Str(c["readinessProbe"]["httpGet"]["path"]), "/readyz");
        EXPECT_EQ(Str(c["livenessProbe"]["httpGet"]["path"]), "/healthz");
        EXPECT_EQ(std::to_string(ports["http"]), args["http_port"]);
      }
    }
  }
  for (const YAML::Node& s : r.All("Service")) {
    SCOPED_TRACE("Service " + Str(s["metadata"]["name"]));
    const YAML::Node d = DeploymentOf(r, s);
    ASSERT_TRUE(d) << "selects no Deployment";
    std::set<std::string> port_names;
    for (const YAML::Node& c : d["spec"]["template"]["spec"]["containers"]) {
      for (const YAML::Node& p : c["ports"]) port_names.insert(Str(p["name"]));
    }
    for (const YAML::Node& p : s["spec"]["ports"]) {
      EXPECT_TRUE(port_names.count(Str(p["targetPort"]))) << Str(p["targetPort"]);
    }
  }
  for (const YAML::Node& h : r.All("HorizontalPodAutoscaler")) {
    SCOPED_TRACE("HPA " + Str(h["metadata"]["name"]));
    EXPECT_EQ(Str(h["spec"]["scaleTargetRef"]["apiVersion"]), "apps/v1");
    EXPECT_TRUE(
        r.Find(Str(h["spec"]["scaleTargetRef"]["kind"]), Str(h["spec"]["scaleTargetRef"]["name"])));
    EXPECT_LE(h["spec"]["minReplicas"].as<int>(), h["spec"]["maxReplicas"].as<int>());
    EXPECT_FALSE(r.Find("Deployment", Str(h["spec"]["scaleTargetRef"]["name"]))["spec"]["replicas"])
        << "a Deployment scaled by an HPA should not fix spec.replicas";
  }
}

TEST_P(OverlayTest, PolicyPassesCheckAndItsPoolsAreTheWorkerDeployments) {
  Rendered r = RenderOverlay(GetParam());
  const YAML::Node gateway = r.Find("Deployment", "kvgate-gateway");
  ASSERT_TRUE(gateway);
  const YAML::Node container = ContainerOf(gateway, "kvgate-gateway");
  ASSERT_TRUE(container);
  const fs::path policy_in_pod = ArgsOf(container)["policy"];
  // The ConfigMap volume mounted at the policy's directory, and the generated file behind the key.
  std::string configmap;
  for (const YAML::Node& m : container["volumeMounts"]) {
    if (Str(m["mountPath"]) != policy_in_pod.parent_path().string()) continue;
    for (const YAML::Node& v : gateway["spec"]["template"]["spec"]["volumes"]) {
      if (Str(v["name"]) == Str(m["name"])) configmap = Str(v["configMap"]["name"]);
    }
  }
  ASSERT_FALSE(configmap.empty()) << "no ConfigMap mounted at " << policy_in_pod.parent_path();
  ASSERT_TRUE(r.generated_files[configmap].count(policy_in_pod.filename().string()));
  const fs::path policy_file = r.generated_files[configmap][policy_in_pod.filename().string()];

  CommandResult check =
      RunCommand(testing::BinaryDir() + "/bin/kvgate policy check " + policy_file.string());
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_NE(check.output.find("OK (hash"), std::string::npos) << check.output;

  const YAML::Node policy = YAML::LoadFile(policy_file.string());
  std::set<std::string> pooled_deployments;
  for (const YAML::Node& pool : policy["pools"]) {
    const std::string name = Str(pool["name"]);
    SCOPED_TRACE("pool " + name);
    const std::string dns = Str(pool["dns"]);
    ASSERT_FALSE(dns.empty()) << "Kubernetes pools are discovered through `dns:`";
    const std::string host = dns.substr(0, dns.rfind(':'));
    const std::string port = dns.substr(dns.rfind(':') + 1);
    const std::string service_name = host.substr(0, host.find('.'));
    const YAML::Node service = r.Find("Service", service_name);
    ASSERT_TRUE(service) << "no Service " << service_name;
    EXPECT_EQ(Str(service["spec"]["clusterIP"]), "None") << "pool Services must be headless";
    bool has_port = false;
    for (const YAML::Node& p : service["spec"]["ports"]) has_port |= Str(p["port"]) == port;
    EXPECT_TRUE(has_port) << service_name << " does not expose port " << port;
    const YAML::Node deployment = DeploymentOf(r, service);
    ASSERT_TRUE(deployment);
    pooled_deployments.insert(Str(deployment["metadata"]["name"]));
    const YAML::Node worker = ContainerOf(deployment, "kvgate-worker");
    ASSERT_TRUE(worker);
    auto args = ArgsOf(worker);
    EXPECT_EQ(Lower(args["kv"]), Lower(Str(pool["kv_format"])))
        << "the Deployment's --kv must be the pool's kv_format (else format_mismatch)";
    EXPECT_EQ(args["port"], port);
    if (args.count("max_context")) {
      EXPECT_GE(std::stoll(args["max_context"]), pool["max_context"].as<long long>())
          << "workers would report a smaller max_context than the policy routes to them";
    }
  }
  for (const YAML::Node& d : r.All("Deployment")) {
    if (ContainerOf(d, "kvgate-worker")) {
      EXPECT_TRUE(pooled_deployments.count(Str(d["metadata"]["name"])))
          << Str(d["metadata"]["name"]) << " is in no policy pool";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Overlays, OverlayTest, ::testing::Values("cpu", "gpu"));

TEST(DeployManifests, CpuOverlayUsesTheCpuImageAndGpuOverlayRequestsGpus) {
  for (const YAML::Node& d : RenderOverlay("cpu").All("Deployment")) {
    for (const YAML::Node& c : d["spec"]["template"]["spec"]["containers"]) {
      EXPECT_EQ(Str(c["image"]), "kvgate:0.1.0");
      EXPECT_FALSE(c["resources"]["limits"]["nvidia.com/gpu"]);
    }
  }
  Rendered gpu = RenderOverlay("gpu");
  int gpu_workers = 0;
  for (const YAML::Node& d : gpu.All("Deployment")) {
    const YAML::Node pod = d["spec"]["template"]["spec"];
    for (const YAML::Node& c : pod["containers"]) {
      EXPECT_EQ(Str(c["image"]), "kvgate-cuda:0.1.0");
    }
    const YAML::Node worker = ContainerOf(d, "kvgate-worker");
    if (!worker) continue;
    ++gpu_workers;
    SCOPED_TRACE(Str(d["metadata"]["name"]));
    EXPECT_EQ(Str(worker["resources"]["limits"]["nvidia.com/gpu"]), "1");
    EXPECT_EQ(Str(pod["nodeSelector"]["nvidia.com/gpu.present"]), "true");
    bool tolerates = false;
    for (const YAML::Node& t : pod["tolerations"]) tolerates |= Str(t["key"]) == "nvidia.com/gpu";
    EXPECT_TRUE(tolerates);
  }
  EXPECT_GE(gpu_workers, 3);
}

// ---- Prometheus rules and the dashboard
// ------------------------------------------------------------

YAML::Node RulesFile() {
  return YAML::LoadFile((DeployDir() / "prometheus" / "kvgate-rules.yaml").string());
}

TEST(DeployMonitoring, PrometheusRuleEqualsTheRulesFile) {
  const YAML::Node file = RulesFile();
  const YAML::Node operator_rule =
      YAML::LoadFile((DeployDir() / "k8s" / "monitoring" / "prometheusrule.yaml").string());
  EXPECT_EQ(YAML::Dump(operator_rule["spec"]["groups"]), YAML::Dump(file["groups"]));
}

TEST(DeployMonitoring, RulesAreWellFormedAndCoverTheRequiredAlerts) {
  const YAML::Node file = RulesFile();
  std::set<std::string> records;
  std::vector<std::string> alert_exprs;
  for (const YAML::Node& g : file["groups"]) {
    ASSERT_FALSE(Str(g["name"]).empty());
    for (const YAML::Node& rule : g["rules"]) {
      EXPECT_NE(rule["record"].IsDefined(), rule["alert"].IsDefined())
          << "a rule is either a record or an alert";
      EXPECT_FALSE(Str(rule["expr"]).empty());
      if (rule["record"]) records.insert(Str(rule["record"]));
      if (rule["alert"]) {
        EXPECT_FALSE(Str(rule["annotations"]["summary"]).empty()) << Str(rule["alert"]);
        alert_exprs.push_back(Str(rule["expr"]));
      }
    }
  }
  // Every recording rule an alert uses is defined; the alerts cover what the operators asked for.
  static const std::regex kRecordName(R"([a-z_]+:[a-zA-Z0-9_]+:[a-zA-Z0-9_]+)");
  std::string all;
  for (const std::string& e : alert_exprs) {
    all += e + "\n";
    for (std::sregex_iterator it(e.begin(), e.end(), kRecordName), end; it != end; ++it) {
      EXPECT_TRUE(records.count(it->str())) << "undefined recording rule " << it->str();
    }
  }
  for (const char* needle : {"time_to_first_token_seconds:p99", "fallbacks_per_request",
                             "result=\"failed\"", "kvgate_worker_kv_cache_utilization_ratio > 0.9",
                             "kvgate_gateway_endpoint_kv_format_mismatch"}) {
    EXPECT_NE(all.find(needle), std::string::npos) << "no alert on " << needle;
  }
}

nlohmann::json Dashboard() {
  return nlohmann::json::parse(ReadFile(DeployDir() / "grafana" / "kvgate-dashboard.json"));
}

void CollectStrings(const nlohmann::json& j, const std::set<std::string>& keys,
                    std::vector<std::string>& out) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (keys.count(it.key()) && it.value().is_string()) out.push_back(it.value());
      if (keys.count(it.key()) && it.value().is_object() && it.value().contains("query")) {
        out.push_back(it.value()["query"].get<std::string>());
      }
      CollectStrings(it.value(), keys, out);
    }
  } else if (j.is_array()) {
    for (const auto& v : j) CollectStrings(v, keys, out);
  }
}

TEST(DeployMonitoring, DashboardIsProvisionableAndLaidOut) {
  const nlohmann::json d = Dashboard();
  EXPECT_EQ(d.value("uid", ""), "kvgate-overview");
  std::set<int> ids;
  int queries = 0;
  std::vector<std::array<int, 4>> boxes;
  for (const auto& p : d["panels"]) {
    EXPECT_TRUE(ids.insert(p["id"].get<int>()).second) << "duplicate panel id " << p["id"];
    const auto& g = p["gridPos"];
    const std::array<int, 4> box{g["x"].get<int>(), g["y"].get<int>(), g["w"].get<int>(),
                                 g["h"].get<int>()};
    EXPECT_LE(box[0] + box[2], 24) << p["title"];
    for (const auto& other : boxes) {
      const bool overlap = box[0] < other[0] + other[2] && other[0] < box[0] + box[2] &&
                           box[1] < other[1] + other[3] && other[1] < box[1] + box[3];
      EXPECT_FALSE(overlap) << p["title"] << " overlaps another panel";
    }
    boxes.push_back(box);
    if (p["type"] == "row") continue;
    EXPECT_FALSE(p.value("description", "").empty()) << p["title"];
    EXPECT_EQ(p["datasource"]["uid"], "${datasource}") << p["title"];
    ASSERT_FALSE(p["targets"].empty()) << p["title"];
    for (const auto& t : p["targets"]) {
      EXPECT_FALSE(t.value("expr", "").empty()) << p["title"];
      ++queries;
    }
  }
  EXPECT_GE(queries, 30);
}

// ---- The CPU overlay on loopback, and the metric names
// -------------------------------------------

struct Family {
  std::string type;
  std::set<std::string> labels;
};

// Parses the Prometheus text format: family name -> type and every label name seen on its series.
std::map<std::string, Family> ParseMetrics(const std::string& text) {
  std::map<std::string, Family> families;
  std::istringstream lines(text);
  std::string current;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream fields(line.substr(7));
      std::string type;
      fields >> current >> type;
      families[current].type = type;
      continue;
    }
    if (line.empty() || line[0] == '#') continue;
    auto brace = line.find('{');
    if (brace == std::string::npos || current.empty()) continue;
    Family& f = families[current];
    // label="value",... with backslash escapes inside values.
    size_t i = brace + 1;
    while (i < line.size() && line[i] != '}') {
      auto eq = line.find('=', i);
      if (eq == std::string::npos) break;
      f.labels.insert(line.substr(i, eq - i));
      i = eq + 2;  // past ="
      while (i < line.size() && line[i] != '"') i += line[i] == '\\' ? 2 : 1;
      i += 1;  // closing quote
      if (i < line.size() && line[i] == ',') ++i;
    }
  }
  return families;
}

// Labels every kvgate series gets from the scrape (Kubernetes target labels) or from histograms.
const std::set<std::string>& TargetLabels() {
  static const auto* labels = new std::set<std::string>{
      "namespace", "pod", "job", "instance", "component", "kvgate_pool", "container", "le"};
  return *labels;
}

struct LiveStack {
  std::string setup_error;
  std::map<std::string, Family> families;  // gateway and worker /metrics together
  struct Served {
    std::string what, pool, kv_format, matched_route;
    std::vector<std::string> fallback_reasons;
    grpc::Status status;
  };
  std::vector<Served> served;
  YAML::Node policy;
};

pb::GenerateRequest Request(const std::string& prompt, pb::Precision precision) {
  pb::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_max_tokens(4);
  req.mutable_sampling()->set_ignore_eos(true);
  req.set_precision(precision);
  return req;
}

LiveStack::Served Generate(pb::Gateway::Stub& stub, const std::string& what,
                           const pb::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&ctx, req);
  pb::GenerateChunk chunk, last;
  while (reader->Read(&chunk)) last = chunk;
  LiveStack::Served s{.what = what,
                      .pool = last.route().pool(),
                      .kv_format = last.route().kv_format(),
                      .matched_route = last.route().matched_route(),
                      .fallback_reasons = {},
                      .status = grpc::Status::OK};
  for (const auto& f : last.route().fallbacks()) s.fallback_reasons.push_back(f.reason());
  s.status = reader->Finish();
  return s;
}

// Starts the CPU overlay's workers and gateway from the build with their rendered arguments (model
// path, host and ports rewritten for loopback), drives requests through every pool and one
// fallback, then scrapes every /metrics.
LiveStack StartCpuOverlayOnLoopback() {
  LiveStack stack;
  const std::string model = testing::TinyModelDir();
  if (model.empty()) {
    stack.setup_error = "tiny model not generated (needs python3-numpy)";
    return stack;
  }
  Rendered r = RenderOverlay("cpu");
  const YAML::Node gateway_container =
      ContainerOf(r.Find("Deployment", "kvgate-gateway"), "kvgate-gateway");
  const std::string policy_key = fs::path(ArgsOf(gateway_container)["policy"]).filename();
  const fs::path policy_file = r.generated_files["kvgate-policy"][policy_key];
  stack.policy = YAML::LoadFile(policy_file.string());

  auto argv_for = [&](const YAML::Node& container, std::map<std::string, std::string> overrides) {
    const std::string binary = container["command"][0].as<std::string>();
    std::vector<std::string> argv = {testing::BinaryDir() + "/bin/" + binary};
    auto args = ArgsOf(container);
    for (auto& [k, v] : overrides) args[k] = v;
    for (auto& [k, v] : args) argv.push_back("--" + k + "=" + v);
    return argv;
  };

  // Workers, keyed by the Service that selects them.
  std::map<std::string, std::unique_ptr<Subprocess>> workers;
  std::map<std::string, int> worker_port, worker_metrics_port;
  for (const YAML::Node& service : r.All("Service")) {
    const YAML::Node d = DeploymentOf(r, service);
    const YAML::Node c = ContainerOf(d, "kvgate-worker");
    if (!c) continue;
    const std::string name = Str(service["metadata"]["name"]);
    auto w = Subprocess::Start(argv_for(c, {{"model", model},
                                            {"host", "127.0.0.1"},
                                            {"port", "0"},
                                            {"metrics_port", "0"},
                                            {"threads", "1"},
                                            {"kv_cache_mb", "16"}}));
    int port = w ? w->WaitForListening(std::chrono::seconds(60)) : -1;
    if (port <= 0) {
      stack.setup_error = "worker " + name + " did not start";
      return stack;
    }
    worker_port[name] = port;
    worker_metrics_port[name] = w->PrintedPort("METRICS");
    workers[name] = std::move(w);
  }

  // The overlay's policy with each `dns: <service>:<port>` pool pointed at the loopback worker.
  std::string policy_text = ReadFile(policy_file);
  std::string loopback;
  static const std::regex kDns(R"(^(\s*)dns:\s*([A-Za-z0-9.-]+):(\d+)\s*$)");
  static const std::regex kRefresh(R"(^\s*dns_refresh_ms:.*$)");
  std::istringstream lines(policy_text);
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (std::regex_match(line, m, kDns)) {
      const std::string service = m[2].str().substr(0, m[2].str().find('.'));
      loopback +=
          m[1].str() + "endpoints: [\"127.0.0.1:" + std::to_string(worker_port[service]) + "\"]\n";
    } else if (!std::regex_match(line, kRefresh)) {
      loopback += line + "\n";
    }
  }
  const std::string loopback_policy =
      ::testing::TempDir() + "/deploy_test_policy_" + std::to_string(getpid()) + ".yaml";
  std::ofstream(loopback_policy) << loopback;

  auto gateway = Subprocess::Start(argv_for(gateway_container, {{"policy", loopback_policy},
                                                                {"model", model},
                                                                {"host", "127.0.0.1"},
                                                                {"port", "0"},
                                                                {"http_port", "0"},
                                                                {"probe_interval_ms", "100"}}));
  int port = gateway ? gateway->WaitForListening(std::chrono::seconds(30)) : -1;
  if (port <= 0) {
    stack.setup_error = "gateway did not start";
    return stack;
  }
  const int http_port = gateway->PrintedPort("HTTP");
  auto stub = pb::Gateway::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  // Ready once every endpoint is probed SERVING.
  bool ready = false;
  for (int i = 0; i < 150 && !ready; ++i) {
    std::string m = testing::HttpGet(http_port, "/metrics").value_or("");
    size_t healthy = 0;
    for (size_t at = m.find("\nkvgate_gateway_endpoint_healthy{"); at != std::string::npos;
         at = m.find("\nkvgate_gateway_endpoint_healthy{", at + 1)) {
      healthy += m.compare(m.find('}', at) + 1, 2, " 1") == 0;
    }
    ready = healthy == workers.size() && testing::HttpGet(http_port, "/readyz") == "ok\n";
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!ready) {
    stack.setup_error = "gateway never saw every worker SERVING";
    return stack;
  }

  stack.served.push_back(Generate(
      *stub, "chat", Request("Hello there, how are you today?", pb::PRECISION_UNSPECIFIED)));
  stack.served.push_back(
      Generate(*stub, "full", Request("Hello there, how are you today?", pb::PRECISION_FULL)));
  stack.served.push_back(Generate(
      *stub, "legal",
      Request("Summarize the governing law clause of this contract.", pb::PRECISION_UNSPECIFIED)));

  // Scrape the workers while all run; then stop the compressed pool's worker so that a chat
  // request falls back (no_healthy_endpoint) and the fallback series exist.
  for (const auto& [name, mport] : worker_metrics_port) {
    for (auto& [k, f] : ParseMetrics(testing::HttpGet(mport, "/metrics").value_or(""))) {
      stack.families[k].type = f.type;
      stack.families[k].labels.insert(f.labels.begin(), f.labels.end());
    }
  }
  // The catch-all route's primary pool, and the Service its `dns:` names.
  const YAML::Node routes = stack.policy["routes"];
  const std::string first_pool = Str(routes[routes.size() - 1]["pools"][0]);
  std::string first_service;
  for (const YAML::Node& pool : stack.policy["pools"]) {
    const std::string dns = Str(pool["dns"]);
    if (Str(pool["name"]) == first_pool) first_service = dns.substr(0, dns.find_first_of(".:"));
  }
  if (workers.count(first_service)) {
    workers[first_service]->Signal(SIGTERM);
    workers[first_service]->Wait(std::chrono::seconds(30));
  }
  for (int i = 0; i < 50; ++i) {
    LiveStack::Served s = Generate(*stub, "chat after the default pool stopped",
                                   Request("Hello again.", pb::PRECISION_UNSPECIFIED));
    if (!s.fallback_reasons.empty() || i == 49) {
      stack.served.push_back(s);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (auto& [k, f] : ParseMetrics(testing::HttpGet(http_port, "/metrics").value_or(""))) {
    stack.families[k].type = f.type;
    stack.families[k].labels.insert(f.labels.begin(), f.labels.end());
  }
  gateway->Signal(SIGTERM);
  gateway->Wait(std::chrono::seconds(40));
  for (auto& [name, w] : workers) {
    if (w->Running()) w->Signal(SIGTERM);
    w->Wait(std::chrono::seconds(40));
  }
  std::remove(loopback_policy.c_str());
  return stack;
}

class CpuOverlayOnLoopback : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { stack_ = new LiveStack(StartCpuOverlayOnLoopback()); }
  static void TearDownTestSuite() {
    delete stack_;
    stack_ = nullptr;
  }
  void SetUp() override {
    if (stack_->setup_error.find("tiny model") != std::string::npos) {
      GTEST_SKIP() << stack_->setup_error;
    }
    ASSERT_TRUE(stack_->setup_error.empty()) << stack_->setup_error;
  }

  // Checks one PromQL expression: every kvgate metric it names exists (a histogram's
  // _bucket/_sum/_count count as the family), every label it selects on or groups by exists on the
  // metrics it names (or is a scrape target label), every recording rule it names is defined.
  void CheckExpression(const std::string& where, const std::string& expr,
                       const std::set<std::string>& records) {
    SCOPED_TRACE(where + ": " + expr);
    // Drop quoted strings (label values, regexes) so that only names remain.
    const std::string bare = std::regex_replace(expr, std::regex(R"("([^"\\]|\\.)*")"), "\"\"");
    static const std::regex kName(R"([A-Za-z_:][A-Za-z0-9_:]*)");
    static const std::regex kSelector(R"(([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\})");
    static const std::regex kLabelMatcher(R"(([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=))");
    static const std::regex kGrouping(R"(\b(?:by|without)\s*\(([^)]*)\))");
    std::set<std::string> labels_here = TargetLabels();
    auto family_of = [&](const std::string& name) -> const Family* {
      if (auto it = stack_->families.find(name); it != stack_->families.end()) return &it->second;
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        const std::string s = suffix;
        if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) {
          auto it = stack_->families.find(name.substr(0, name.size() - s.size()));
          if (it != stack_->families.end() && it->second.type == "histogram") return &it->second;
        }
      }
      return nullptr;
    };
    int names = 0;
    for (std::sregex_iterator it(bare.begin(), bare.end(), kName), end; it != end; ++it) {
      const std::string name = it->str();
      if (name.find(':') != std::string::npos) {
        EXPECT_TRUE(records.count(name)) << "undefined recording rule " << name;
        ++names;
      } else if (name.rfind("kvgate_", 0) == 0) {
        const Family* f = family_of(name);
        EXPECT_NE(f, nullptr) << "no metric family " << name << " in the gateway's or workers' "
                              << "/metrics";
        if (f != nullptr) labels_here.insert(f->labels.begin(), f->labels.end());
        ++names;
      }
    }
    EXPECT_GT(names, 0) << "names no kvgate metric";
    for (std::sregex_iterator it(bare.begin(), bare.end(), kSelector), end; it != end; ++it) {
      const std::string name = (*it)[1];
      const Family* f = family_of(name);
      if (f == nullptr) continue;
      const std::string matchers = (*it)[2];
      for (std::sregex_iterator m(matchers.begin(), matchers.end(), kLabelMatcher); m != end; ++m) {
        const std::string label = (*m)[1];
        EXPECT_TRUE(f->labels.count(label) || TargetLabels().count(label))
            << name << " has no label '" << label << "'";
      }
    }
    if (!records.empty() && labels_here.size() == TargetLabels().size()) return;  // records only
    for (std::sregex_iterator it(bare.begin(), bare.end(), kGrouping), end; it != end; ++it) {
      std::stringstream list((*it)[1].str());
      for (std::string label; std::getline(list, label, ',');) {
        label = std::regex_replace(label, std::regex(R"(\s+)"), "");
        if (label.empty()) continue;
        EXPECT_TRUE(labels_here.count(label)) << "grouping by unknown label '" << label << "'";
      }
    }
  }

  static std::set<std::string> RecordNames() {
    std::set<std::string> records;
    for (const YAML::Node& g : RulesFile()["groups"]) {
      for (const YAML::Node& rule : g["rules"]) {
        if (rule["record"]) records.insert(Str(rule["record"]));
      }
    }
    return records;
  }

  static LiveStack* stack_;
};

LiveStack* CpuOverlayOnLoopback::stack_ = nullptr;

TEST_F(CpuOverlayOnLoopback, RoutesAsThePolicySaysWithTheDeclaredKvFormats) {
  std::map<std::string, std::string> declared;
  for (const YAML::Node& pool : stack_->policy["pools"]) {
    declared[Str(pool["name"])] = Lower(Str(pool["kv_format"]));
  }
  ASSERT_EQ(stack_->served.size(), 4u);
  for (const auto& s : stack_->served) {
    SCOPED_TRACE(s.what);
    EXPECT_TRUE(s.status.ok()) << s.status.error_message();
    ASSERT_TRUE(declared.count(s.pool)) << "served by unknown pool '" << s.pool << "'";
    EXPECT_EQ(s.kv_format, declared[s.pool]) << "worker format differs from the policy's";
  }
  EXPECT_EQ(stack_->served[0].matched_route, "default");
  EXPECT_TRUE(stack_->served[0].fallback_reasons.empty());
  const YAML::Node routes = stack_->policy["routes"];
  EXPECT_EQ(stack_->served[0].pool, Str(routes[routes.size() - 1]["pools"][0]));
  EXPECT_EQ(stack_->served[1].matched_route, "explicit_full");
  std::set<std::string> full_pools;
  for (const YAML::Node& pool : stack_->policy["pools"]) {
    if (Str(pool["precision"]) == "full") full_pools.insert(Str(pool["name"]));
  }
  EXPECT_TRUE(full_pools.count(stack_->served[1].pool)) << stack_->served[1].pool;
  EXPECT_EQ(stack_->served[2].matched_route, "accuracy_sensitive");
  EXPECT_NE(stack_->served[0].pool, stack_->served[3].pool);
  ASSERT_FALSE(stack_->served[3].fallback_reasons.empty());
  EXPECT_EQ(stack_->served[3].fallback_reasons[0], "no_healthy_endpoint");
}

TEST_F(CpuOverlayOnLoopback, DashboardUsesOnlyExistingMetricsAndCoversEveryFamily) {
  std::vector<std::string> exprs;
  CollectStrings(Dashboard(), {"expr", "query"}, exprs);
  ASSERT_GE(exprs.size(), 30u);
  std::string all;
  for (const std::string& e : exprs) {
    if (e == "prometheus") continue;  // the data source variable's plugin type
    CheckExpression("dashboard", e, {});
    all += e + "\n";
  }
  // Every kvgate family the binaries export is on the dashboard; histograms as quantiles.
  for (const auto& [name, family] : stack_->families) {
    if (name.rfind("kvgate_", 0) != 0) continue;
    const std::string used = family.type == "histogram" ? name + "_bucket" : name;
    EXPECT_NE(all.find(used), std::string::npos) << name << " is not on the dashboard";
  }
  EXPECT_GE(std::count_if(stack_->families.begin(), stack_->families.end(),
                          [](const auto& f) { return f.first.rfind("kvgate_", 0) == 0; }),
            29);
}

TEST_F(CpuOverlayOnLoopback, PrometheusRulesUseOnlyExistingMetrics) {
  const std::set<std::string> records = RecordNames();
  for (const YAML::Node& g : RulesFile()["groups"]) {
    for (const YAML::Node& rule : g["rules"]) {
      const std::string name = rule["record"] ? Str(rule["record"]) : Str(rule["alert"]);
      CheckExpression(name, Str(rule["expr"]), records);
    }
  }
}

TEST_F(CpuOverlayOnLoopback, AutoscalersAndAdapterUseOnlyExistingMetrics) {
  const YAML::Node adapter =
      YAML::LoadFile((DeployDir() / "prometheus" / "prometheus-adapter-rules.yaml").string());
  std::set<std::string> served_by_adapter;
  for (const YAML::Node& rule : adapter["rules"]["custom"]) {
    CheckExpression("adapter", Str(rule["seriesQuery"]), {});
    served_by_adapter.insert(Str(rule["name"]["as"]));
  }
  for (const char* overlay : {"cpu", "gpu"}) {
    for (const YAML::Node& h : RenderOverlay(overlay).All("HorizontalPodAutoscaler")) {
      for (const YAML::Node& m : h["spec"]["metrics"]) {
        if (Str(m["type"]) != "Pods") continue;
        const std::string metric = Str(m["pods"]["metric"]["name"]);
        SCOPED_TRACE(std::string(overlay) + " HPA " + Str(h["metadata"]["name"]));
        EXPECT_TRUE(stack_->families.count(metric)) << metric;
        EXPECT_TRUE(served_by_adapter.count(metric)) << metric << " is not served by the adapter";
      }
    }
  }
}

}  // namespace
}  // namespace kvgate
