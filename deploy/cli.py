"""`scorehost deploy plan | aks | managed | traffic | teardown | k8s` and `scorehost parity`: argument parsing and
the order of steps.

Each DeploySettings field is a flag (`--vm-size`, `--instance-count`...) of the commands it applies to, on top of an
optional YAML file (--config). A command whose packages are not installed says so in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Optional

from deploy.settings import (AKS, K8S, MANAGED, PLAN, TEARDOWN, TRAFFIC, DeployError, DeploySettings,
                             WorkspaceNotFound, fields_for, is_reference)
from scorehost.extras import install_line, missing

AZURE_V2 = ("azure.ai.ml", "azure.identity", "azure.mgmt.containerservice", "azure.mgmt.kubernetesconfiguration",
            "azure.mgmt.resource", "kubernetes", "yaml")


def require(command: str, modules: tuple[str, ...], extra: str = "deploy") -> None:
    absent = missing(modules)
    if absent:
        raise DeployError(install_line(command, absent, extra))


def require_sdk(command: str, s: DeploySettings) -> None:
    """The Azure ML SDK the settings choose: v2 (the `deploy` extra) or v1 (`deploy-v1`, in its own virtualenv)."""
    if s.sdk == "v1":
        require(command, ("azureml.core",), "deploy-v1")
    else:
        require(command, AZURE_V2)


def add_settings_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="YAML file of deployment settings (flags override it)")
    for field in fields_for(command):
        flag = "--" + field.name.replace("_", "-")
        doc = field.metadata["doc"] + (f" (default: {field.default})" if field.default not in ("", None, False) else "")
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action="store_true", default=None, help=doc)
        else:
            kind = int if "int" in str(field.type) else str
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=doc.replace("%", "%%"))


def add_no_load_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-load-check", action="store_true", help="skip loading the script with the model (it "
                        "loads in this environment: a script whose packages are in its conda file alone needs them "
                        "installed here, or this)")


def settings_from(args: argparse.Namespace, **fixed: Any) -> DeploySettings:
    names = {f.name for f in dataclasses.fields(DeploySettings)}
    return DeploySettings.load(args.config, **{k: v for k, v in vars(args).items() if k in names}, **fixed)


def _demo_model(s: DeploySettings, command: str) -> DeploySettings:
    """The demo model goes with the reference score.py alone, as in `scorehost serve`: another script would be
    checked and shipped with a model it was never written for."""
    if s.model_dir:
        return s
    if not is_reference(s.entry_script):
        raise DeployError(f"scorehost deploy {command}: no model directory for {s.entry_script} (the demo model is the "
                          "reference score.py's): pass --model-dir DIR")
    from scorehost.models import demo_model_dir

    return dataclasses.replace(s, model_dir=demo_model_dir())


def _target(s: DeploySettings, command: str) -> DeploySettings:
    """The endpoint `traffic` and `teardown` act on: the one deploy named from the same flags (entry script, model
    directory or name, workspace). A user's script without them would name the demo's endpoint: refused instead.
    The demo model is not built for a name: its name is the one model_name_of gives for no directory."""
    if not (s.endpoint or s.model_dir or s.model_name or is_reference(s.entry_script)):
        raise DeployError(f"scorehost deploy {command}: which endpoint? pass the --model-dir given to deploy (with "
                          f"--entry-script {s.entry_script}), or --endpoint NAME")
    return s.with_workspace()


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, OSError):  # no terminal: no confirmation
        return False


def cmd_plan(args: argparse.Namespace) -> int:
    require("deploy plan", ("yaml", "azure.ai.ml") if args.out else ("yaml",))
    from deploy import plan, source

    s, no_workspace = _demo_model(settings_from(args), PLAN), ""
    try:
        s = s.with_workspace()
    except WorkspaceNotFound as ex:
        s, no_workspace = s.named(), ex.reason  # a plan needs no workspace: it says none is known yet, and why
    found = plan.problems(s, load_check=not args.no_load_check)
    if args.out and (occupied := source.output_problem(args.out)):
        found.append(occupied)
    if args.out and s.endpoint_pending:
        found.append("--out writes the endpoint's name, whose last 6 characters come from the workspace: give the "
                     "workspace (above) or --endpoint NAME")
    plan.print_plan(s, no_workspace)
    if found:
        print("\nProblems:\n" + "\n".join(f"  - {p}" for p in found))
        return 1
    print("\nAll local checks passed (the script loads with the model from its code folder, the conda file parses, "
          "names are legal).")
    if args.out:
        from deploy import azure_v2

        paths = azure_v2.export(s, args.out)
        print("\nWritten (what the SDK sends, as az ml YAML):\n" + "\n".join(f"  {p}" for p in paths) +
              "\nApply by hand, in this order:\n" + "\n".join(f"  {line}" for line in azure_v2.apply_by_hand(s, paths)))
    return 0


def _deploy(args: argparse.Namespace, target: str, clients: Any = None) -> int:
    """`deploy aks` and `deploy managed`: the same steps, with or without the cluster side."""
    from deploy import plan

    s = settings_from(args, target=target)
    require_sdk(f"deploy {target}", s)
    from deploy import parity

    check = None if args.skip_parity else parity.gate(f"deploy {target}", s.entry_script, s.model_dir, parity.MANAGED
                                                      if target == MANAGED else parity.KUBERNETES,
                                                      args.parity_requests, tuple(args.parity_ignore or ()))
    s = _demo_model(s, target)
    found = plan.problems(s)
    if found:
        raise DeployError(f"scorehost deploy {target}: fix these first (see `scorehost deploy plan`):\n" +
                          "\n".join(f"  - {p}" for p in found))
    s = s.with_workspace()
    plan.print_plan(s)
    if not _confirm("Create or update these resources (they bill while they exist)?", args.yes):
        print("nothing created")
        return 1
    if s.sdk == "v1":
        from azureml.core import Workspace

        from deploy import azure_v1

        result = azure_v1.deploy(clients or Workspace(s.subscription_id, s.resource_group, s.workspace), s)
        return 0 if check is None or check(result["scoring_uri"], result["key"], "") else 1
    from deploy import azure_v2

    azure_v2.deploy(clients or azure_v2.connect(s), s, managed=target == MANAGED, check=check)
    return 0


def cmd_aks(args: argparse.Namespace, clients: Any = None) -> int:
    return _deploy(args, AKS, clients)


def cmd_managed(args: argparse.Namespace, clients: Any = None) -> int:
    return _deploy(args, MANAGED, clients)


def cmd_traffic(args: argparse.Namespace, clients: Any = None) -> int:
    require("deploy traffic", AZURE_V2)
    from deploy import azure_v2

    requested = {}
    for item in args.shares:
        match = re.fullmatch(r"([a-z0-9][a-z0-9-]*)=(\d{1,3})", item)
        if not match:
            raise DeployError(f"scorehost deploy traffic: {item!r} is not DEPLOYMENT=PERCENT (e.g. green=10)")
        requested[match[1]] = int(match[2])
    s = _target(settings_from(args), TRAFFIC)
    with azure_v2.one_line("deploy traffic"):
        azure_v2.set_traffic((clients or azure_v2.connect(s)).ml, s, requested)
    return 0


def cmd_teardown(args: argparse.Namespace, clients: Any = None) -> int:
    s = settings_from(args)
    require_sdk("deploy teardown", s)
    s = _target(s, TEARDOWN)
    what = (f"deployment {s.endpoint}/{args.only_deployment}" if args.only_deployment else
            f"endpoint {s.endpoint} with its deployments" + (f" and compute {s.compute}" if args.cluster else ""))
    if not _confirm(f"Delete {what}?", args.yes):
        print("nothing deleted")
        return 1
    if s.sdk == "v1":
        from deploy import azure_v1

        if clients is None:
            from azureml.core import Workspace

            clients = Workspace(s.subscription_id, s.resource_group, s.workspace)
        deleted = azure_v1.teardown(clients, s, args.cluster)
    else:
        from deploy import azure_v2

        def delete_cluster() -> bool:
            return args.delete_cluster or _confirm(
                f"AKS cluster {s.aks_cluster} was created by scorehost: delete it, with all its nodes and disks?",
                False)

        with azure_v2.one_line("deploy teardown"):
            deleted = azure_v2.teardown(clients or azure_v2.connect(s), s, args.cluster, args.only_deployment,
                                        delete_cluster)
    print("deleted: " + (", ".join(deleted) or "nothing"))
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    require("deploy k8s", ("yaml",))
    from deploy import k8s, source
    from deploy.plan import sha256

    s = _demo_model(settings_from(args), K8S).named(azure_ml=False)  # names of the cluster's own: no workspace
    found = k8s.problems(s, args.out, load_check=not args.no_load_check)
    if found:
        raise DeployError("scorehost deploy k8s: " + "; ".join(found))
    paths = k8s.write(s, args.out, args.image)
    print(f"entry script: {os.path.abspath(s.entry_script)} (sha256 {sha256(s.entry_script)[:16]}...)\n"
          f"code folder: {source.root(s.entry_script)}\n"
          f"model directory: {os.path.abspath(s.model_dir)}\n"
          f"both baked into {args.out}/code and {args.out}/model, the image's build context\n" + "\n".join(paths))
    if not k8s.looks_pullable(args.image):
        print(f"note: {args.image} names no registry; the cluster pulls images from one: push it to a registry the "
              "cluster can reach (e.g. myregistry.azurecr.io/scorehost-model:1) and pass that as --image")
    print(f"autoscaler: {s.instance_count} to {k8s.max_replicas(s)} instances of {s.gpus} GPU"
          + ("" if s.cluster_gpus else " (pass --cluster-gpus N to let it grow into the cluster's free GPUs)"))
    print(f"1. build and push the model image: see {paths[0]}\n"
          f"2. the GPU nodes must offer nvidia.com/gpu, which takes NVIDIA's device plugin: {k8s.GPU_CHECK}\n"
          f"   shows a number for each GPU node; where it shows <none>: kubectl apply -f {k8s.DEVICE_PLUGIN}\n"
          f"3. kubectl apply -f {args.out}   (the API key is in {os.path.join(args.out, k8s.SECRET_FILE)}, readable "
          "by you alone)")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from deploy import parity

    return parity.run(args.url, args.key or "", local=args.local, model_dir=args.model_dir,
                      tolerance=args.tolerance, deployment=args.deployment or "", target=args.target,
                      replay_dir=args.replay or "", ignore=tuple(args.ignore))


def register(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="promote to GPU AKS or a managed endpoint (Azure ML), or write plain "
                                           "Kubernetes manifests")
    steps = deploy.add_subparsers(dest="step", required=True)

    def step(name: str, help: str, func: Any, settings_of: Optional[str] = None) -> argparse.ArgumentParser:
        p = steps.add_parser(name, help=help, description=help)
        add_settings_flags(p, settings_of or name)
        p.set_defaults(func=func)
        return p

    p = step(PLAN, "validate locally and print every resource `deploy aks` (or --target managed) would create",
             cmd_plan)
    add_no_load_check(p)
    p.add_argument("--out", help="also write the endpoint and deployment as az ml YAML into this folder")
    for name, help, func in ((AKS, "deploy to an AKS cluster through Azure ML, checked by the parity replay",
                              cmd_aks),
                             (MANAGED, "deploy to a managed online endpoint on a GPU instance type (no cluster)",
                              cmd_managed)):
        p = step(name, help, func)
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.add_argument("--skip-parity", action="store_true", help="move traffic without the parity replay")
        p.add_argument("--parity-requests", metavar="DIR", help="gate on these requests, recorded with `scorehost "
                       "serve --record DIR` (needed for any script but the reference score.py)")
        p.add_argument("--parity-ignore", metavar="PATH", action="append",
                       help="a JSON field of the answers that changes on every call, e.g. created_at (repeat)")
    p = step(TRAFFIC, "shift or roll back the endpoint's traffic, e.g. `green=10` (the others keep their "
                      "proportions of the rest) or `blue=100 green=0`", cmd_traffic)
    p.add_argument("shares", nargs="+", metavar="DEPLOYMENT=PERCENT")
    p = step(TEARDOWN, "delete the endpoint (and with --cluster, detach the compute); say what still bills",
             cmd_teardown)
    p.add_argument("--cluster", action="store_true", help="also detach the compute (SDK v1: detach, or delete a "
                                                          "cluster it created)")
    p.add_argument("--only-deployment", metavar="NAME", help="delete only this deployment (it must take no traffic)")
    p.add_argument("--delete-cluster", action="store_true",
                   help="also delete the AKS cluster, when scorehost created it (asked otherwise)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = step(K8S, "write plain Kubernetes manifests and a Dockerfile that bakes the model into the image", cmd_k8s)
    p.add_argument("--out", required=True, help="folder to write the manifests into")
    add_no_load_check(p)
    p.add_argument("--image", required=True,
                   help="the model image in a registry the cluster pulls from, e.g. myregistry.azurecr.io/model:1")

    p = sub.add_parser("parity", help="replay recorded requests (or the reference corpus) against an endpoint and "
                                      "compare its answers with the local ones")
    p.add_argument("url", help="the endpoint's base URL or scoring URI")
    p.add_argument("--key", help="its bearer key")
    p.add_argument("--deployment", help="send every request to this deployment (azureml-model-deployment header)")
    p.add_argument("--replay", metavar="DIR", help="requests recorded with `scorehost serve --record DIR`, with the "
                                                    "answers to compare with (default: the reference corpus)")
    p.add_argument("--target", choices=["kubernetes", "managed"], default="kubernetes",
                   help="how the endpoint answers: kubernetes as the container does; managed with Azure's 424 for "
                        "a container's non-200 and 413 for bodies over 1.5 MB (default: %(default)s)")
    p.add_argument("--ignore", metavar="PATH", action="append", default=[],
                   help="a JSON field that changes on every call, e.g. created_at or items[*].id (repeat)")
    p.add_argument("--local", help="reference corpus: a running local server to compare with (default: start one on "
                                   "the demo model)")
    p.add_argument("--model-dir", help="reference corpus: model for the local server it starts")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="absolute tolerance for numbers in JSON bodies (default: %(default)s)")
    p.set_defaults(func=cmd_parity)
