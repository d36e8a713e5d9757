"""Cloud promotion: one-command deployment to GPU AKS (Azure ML SDK v2, or v1), plain Kubernetes manifests, teardown."""
