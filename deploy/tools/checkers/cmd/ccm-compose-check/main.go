// ccm-compose-check loads a Compose file the way `docker compose config` does (compose-go:
// Compose specification schema, interpolation, normalisation, consistency checks such as
// depends_on naming a real service) and prints the resolved model as JSON.
//
// It needs no Docker engine: validation is what the Compose CLI does before talking to one.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 || os.Args[1] == "-h" || os.Args[1] == "--help" {
		fmt.Fprintln(os.Stderr, "usage: ccm-compose-check <docker-compose.yml>\n\n"+
			"Validates the file against the Compose specification and prints the resolved\n"+
			"project as JSON on stdout. Exit 1 with the reason on stderr when it is invalid.")
		os.Exit(2)
	}
	path, err := filepath.Abs(os.Args[1])
	if err != nil {
		fail(err)
	}
	// Only the file's own defaults: the caller's environment must not make an invalid file pass.
	opts, err := cli.NewProjectOptions(
		[]string{path},
		cli.WithWorkingDirectory(filepath.Dir(path)),
		cli.WithEnv([]string{}),
		cli.WithConsistency(true),
		cli.WithNormalization(true),
		cli.WithInterpolation(true),
		cli.WithResolvedPaths(false),
	)
	if err != nil {
		fail(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := json.MarshalIndent(project, "", "  ")
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "invalid compose file: %v\n", err)
	os.Exit(1)
}
