// promqlcheck parses every query of Grafana dashboards with Prometheus's own PromQL parser, after
// putting a regex in place of each dashboard variable ($name), so a query that Prometheus would
// refuse fails here instead of on a user's Grafana. Usage: promqlcheck DASHBOARD.json...
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"

	"github.com/prometheus/prometheus/promql/parser"
)

type dashboard struct {
	Panels []struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

var variable = regexp.MustCompile(`\$\{?\w+\}?`)

var promql = parser.NewParser(parser.Options{})

func check(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		return 0, err
	}
	n := 0
	for _, p := range d.Panels {
		for _, t := range p.Targets {
			if _, err := promql.ParseExpr(variable.ReplaceAllString(t.Expr, ".*")); err != nil {
				return n, fmt.Errorf("panel %q: %s: %w", p.Title, t.Expr, err)
			}
			n++
		}
	}
	return n, nil
}

func main() {
	failed := false
	for _, path := range os.Args[1:] {
		n, err := check(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		fmt.Printf("%s: %d queries parse\n", path, n)
	}
	if failed || len(os.Args) < 2 {
		os.Exit(1)
	}
}
