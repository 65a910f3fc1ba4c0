// ccm-dockerfile-lint runs BuildKit's own Dockerfile checks (the rules of
// `docker build --check`, https://docs.docker.com/reference/build-checks/) without a Docker
// engine, and fails on any warning. Base images are not pulled, so the one rule that needs
// them (InvalidBaseImagePlatform) cannot fire here.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerui"
	digest "github.com/opencontainers/go-digest"
)

// offlineImages answers every base image with an empty linux/amd64 config: no registry is
// reachable here, and no check but InvalidBaseImagePlatform needs the real one.
type offlineImages struct{}

func (offlineImages) ResolveImageConfig(
	_ context.Context, ref string, _ sourceresolver.Opt,
) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers"}}`)
	return ref, digest.FromBytes(config), config, nil
}

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" {
		fmt.Fprintln(os.Stderr, "usage: ccm-dockerfile-lint <Dockerfile>...\n\n"+
			"Runs BuildKit's build checks on each Dockerfile; prints one line per finding\n"+
			"(file:line: Rule: message) and exits 1 if there is any.")
		os.Exit(2)
	}
	findings := 0
	for _, path := range os.Args[1:] {
		dt, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			os.Exit(2)
		}
		var found []string
		warn := func(rule, _, _, msg string, location []parser.Range) {
			line := 0
			if len(location) > 0 {
				line = location[0].Start.Line
			}
			found = append(found, fmt.Sprintf("%s:%d: %s: %s", path, line, rule, msg))
		}
		// Outline runs the same conversion as a build (all stages), reporting every check to warn.
		_, err = dockerfile2llb.Dockerfile2Outline(context.Background(), dt, dockerfile2llb.ConvertOpt{
			Config:       dockerui.Config{},
			Warn:         warn,
			AllStages:    true,
			MetaResolver: offlineImages{},
		})
		if err != nil {
			found = append(found, fmt.Sprintf("%s: error: %v", path, err))
		}
		for _, f := range found {
			fmt.Println(f)
		}
		findings += len(found)
	}
	if findings > 0 {
		os.Exit(1)
	}
}
