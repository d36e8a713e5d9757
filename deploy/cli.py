"""`scorehost deploy plan | aks | teardown | k8s` and `scorehost parity`: argument parsing and the order of steps.

Every DeploySettings field is a flag (`--vm-size`, `--replicas`...), on top of an optional YAML file (--config).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from deploy.settings import DeployError, DeploySettings, WorkspaceNotFound


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of deployment settings (flags override it)")
    for field in dataclasses.fields(DeploySettings):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            kind = int if field.type in ("int", int) else str
            parser.add_argument(flag, dest=field.name, type=kind, default=None,
                                help=f"default: {field.default}" if field.default != "" else None)


def settings_from(args: argparse.Namespace) -> DeploySettings:
    names = {f.name for f in dataclasses.fields(DeploySettings)}
    return DeploySettings.load(args.config, **{k: v for k, v in vars(args).items() if k in names})


def _demo_model(s: DeploySettings) -> DeploySettings:
    if s.model_dir:
        return s
    from scorehost.models import demo_model_dir

    return dataclasses.replace(s, model_dir=demo_model_dir())


def cmd_plan(args: argparse.Namespace) -> int:
    from deploy import plan

    s = _demo_model(settings_from(args))
    try:
        s = s.with_workspace()
    except WorkspaceNotFound:
        pass  # a plan needs no workspace: names are shown as placeholders
    found = plan.problems(s, load_check=not args.no_load_check)
    plan.print_plan(s)
    if found:
        print("\nProblems:\n" + "\n".join(f"  - {p}" for p in found))
        return 1
    print("\nAll local checks passed (the script loads with the model, myenv.yml parses, names are legal).")
    return 0


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, OSError):  # no terminal: no confirmation
        return False


def cmd_aks(args: argparse.Namespace, client: Any = None, cluster_clients: Any = None) -> int:
    from deploy import parity, plan

    s = _demo_model(settings_from(args))
    found = plan.problems(s)
    if found:
        raise DeployError("scorehost deploy aks: fix these first (see `scorehost deploy plan`):\n" +
                          "\n".join(f"  - {p}" for p in found))
    s = s.with_workspace()
    plan.print_plan(s)
    if not _confirm("Create these resources (they bill while they exist)?", args.yes):
        print("nothing created")
        return 1
    if s.sdk == "v1":
        from azureml.core import Workspace

        from deploy import azure_v1

        workspace = client or Workspace(s.subscription_id, s.resource_group, s.workspace)
        result = azure_v1.deploy(workspace, s)
    else:
        from deploy import azure_v2, cluster

        if client is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
            client = azure_v2.ml_client(s)
            cluster_clients = cluster.clients(s, credential)
        aks_client, extensions_client = cluster_clients
        if s.create_cluster:
            try:
                cluster.create_cluster(aks_client, extensions_client, s, print)
            except Exception as ex:
                raise DeployError(f"scorehost deploy aks: creating the cluster failed: {azure_v2.explain(ex)}\n"
                                  f"What exists of it is in resource group {s.resource_group}: delete it with "
                                  f"`az aks delete -g {s.resource_group} -n {s.aks_cluster}`") from ex
        result = azure_v2.deploy(client, s, print, lambda s: cluster.create_instance_type(aks_client, s))
    if args.skip_parity:
        return 0
    print("\nParity replay: the cloud endpoint against the local server")
    return parity.run(result["scoring_uri"], result["key"], model_dir=s.model_dir)


def cmd_teardown(args: argparse.Namespace, client: Any = None) -> int:
    s = settings_from(args).with_workspace()
    what = f"endpoint {s.endpoint}" + (f" and compute {s.compute}" if args.cluster else "")
    if not _confirm(f"Delete {what}?", args.yes):
        print("nothing deleted")
        return 1
    if s.sdk == "v1":
        from deploy import azure_v1

        if client is None:
            from azureml.core import Workspace

            client = Workspace(s.subscription_id, s.resource_group, s.workspace)
        deleted = azure_v1.teardown(client, s, args.cluster)
    else:
        from deploy import azure_v2

        deleted = azure_v2.teardown(client or azure_v2.ml_client(s), s, args.cluster)
    print("deleted: " + (", ".join(deleted) or "nothing"))
    if args.cluster:
        print(f"The AKS cluster {s.aks_cluster} itself still exists and bills for its nodes: "
              f"az aks delete -g {s.resource_group} -n {s.aks_cluster}")
    else:
        print(f"Still billing: the AKS cluster {s.aks_cluster} and its GPU nodes (add --cluster to detach the compute,"
              f" then `az aks delete -g {s.resource_group} -n {s.aks_cluster}`).")
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    from deploy import k8s

    paths = k8s.write(settings_from(args), args.out, args.image)
    print("\n".join(paths))
    print(f"kubectl apply -f {args.out}   (the API key is in {args.out}/secret.yaml)")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from deploy import parity

    return parity.run(args.url, args.key or "", local=args.local, model_dir=args.model_dir,
                      tolerance=args.tolerance)


def register(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="promote to GPU AKS (Azure ML), or write plain Kubernetes manifests")
    steps = deploy.add_subparsers(dest="step", required=True)
    p = steps.add_parser("plan", help="validate locally and print every resource `deploy aks` would create")
    add_settings_flags(p)
    p.add_argument("--no-load-check", action="store_true", help="skip loading the script with the model")
    p.set_defaults(func=cmd_plan)
    p = steps.add_parser("aks", help="deploy to an AKS cluster through Azure ML, then replay the parity corpus")
    add_settings_flags(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--skip-parity", action="store_true")
    p.set_defaults(func=cmd_aks)
    p = steps.add_parser("teardown", help="delete the endpoint (and with --cluster, the compute)")
    add_settings_flags(p)
    p.add_argument("--cluster", action="store_true", help="also detach/delete the compute")
    p.add_argument("--yes", action="store_true")
    p.set_defaults(func=cmd_teardown)
    p = steps.add_parser("k8s", help="write plain Kubernetes manifests for the Dockerfile.gpu image")
    add_settings_flags(p)
    p.add_argument("--out", required=True)
    p.add_argument("--image", default="scorehost:gpu")
    p.set_defaults(func=cmd_k8s)

    p = sub.add_parser("parity", help="replay the request corpus against an endpoint and a local server; diff")
    p.add_argument("url", help="the endpoint's base URL or scoring URI")
    p.add_argument("--key", help="its bearer key")
    p.add_argument("--local", help="a running local server to compare with (default: start one on the demo model)")
    p.add_argument("--model-dir", help="model for the local server it starts")
    p.add_argument("--tolerance", type=float, default=1e-3, help="absolute tolerance for probabilities")
    p.set_defaults(func=cmd_parity)
