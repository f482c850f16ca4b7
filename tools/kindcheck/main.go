// kindcheck decodes kind cluster configs strictly into kind's own v1alpha4 types, so a misspelt or
// unknown field fails here instead of on a CI runner with Docker. Usage: kindcheck FILE...
package main

import (
	"fmt"
	"os"

	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"
)

func check(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var cluster v1alpha4.Cluster
	// kind itself loads configs with UnmarshalStrict: unknown fields are errors.
	if err := yaml.UnmarshalStrict(data, &cluster); err != nil {
		return err
	}
	if cluster.Kind != "Cluster" || cluster.APIVersion != "kind.x-k8s.io/v1alpha4" {
		return fmt.Errorf("kind/apiVersion are %q/%q, want Cluster/kind.x-k8s.io/v1alpha4", cluster.Kind, cluster.APIVersion)
	}
	for i, node := range cluster.Nodes {
		if node.Role != v1alpha4.ControlPlaneRole && node.Role != v1alpha4.WorkerRole {
			return fmt.Errorf("nodes[%d]: unknown role %q", i, node.Role)
		}
	}
	v1alpha4.SetDefaultsCluster(&cluster)
	fmt.Printf("%s: ok, %d nodes\n", path, len(cluster.Nodes))
	for i, node := range cluster.Nodes {
		fmt.Printf("  nodes[%d] %s labels=%v\n", i, node.Role, node.Labels)
	}
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kindcheck FILE...")
		os.Exit(2)
	}
	failed := false
	for _, path := range os.Args[1:] {
		if err := check(path); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
