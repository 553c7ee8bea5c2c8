#!/usr/bin/env python3
"""Generates the S6 route table: COUNT Mappings in Emissary YAML.

    bench/mappings.py COUNT ORIGIN_ADDR > mappings.yaml

COUNT includes the two Mappings every pingress target of the benchmark has:
`/b/` (plain upstream) and `/m/` (upstream mutual TLS). The other COUNT - 2
are filler in a realistic mix (one of each kind even in a 10-Mapping table), every one with a prefix longer than `/b/`,
so that in Emissary's order (longest prefix first) the benchmarked request
(`GET /b/small`) matches one of the LAST Mappings and a linear walk pays for
every Mapping before it:

  60 %  plain prefixes                 /svc-00042/api/
  20 %  host globs                     hostname svc42.example.com, *.t42.example.com, api42.*
  15 %  header matches                 headers {x-tenant: t42}, some regex_headers
   5 %  regex prefixes                 prefix_regex: true, /re-00042/[a-z0-9]+/.*

None of the filler can match the benchmarked request, and none of it is ever
proxied: it only costs lookup time and memory.
"""
import sys


# 12 prefixes, 4 host globs, 3 header matches, 1 regex in every 20, spread so
# that even the 10-Mapping table has one of each.
PATTERN = [
    "prefix", "host", "header", "prefix", "regex", "prefix", "host", "prefix", "header", "prefix",
    "prefix", "host", "prefix", "header", "prefix", "host", "prefix", "prefix", "prefix", "prefix",
]


def mapping(name, spec_lines):
    return (
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\n"
        f"metadata: {{name: {name}}}\nspec:\n" + "".join(f"  {line}\n" for line in spec_lines)
    )


def main():
    count = int(sys.argv[1])
    origin = sys.argv[2]
    if count < 2:
        sys.exit("COUNT must be at least 2")
    out = []
    for i in range(count - 2):
        kind = PATTERN[i % len(PATTERN)]
        svc = f"service: {origin}"
        if kind == "prefix":
            out.append(mapping(f"prefix-{i:05d}", ['hostname: "*"', f"prefix: /svc-{i:05d}/api/", svc]))
        elif kind == "host":
            glob = (f"svc{i}.example.com", f'"*.t{i}.example.com"', f'"api{i}.*"')[i % 3]
            out.append(mapping(f"host-{i:05d}", [f"hostname: {glob}", f"prefix: /svc-{i:05d}/", svc]))
        elif kind == "header":
            if i % 2:
                headers = ["regex_headers:", f'  x-tenant: "t{i}-[a-z]+"']
            else:
                headers = ["headers:", f"  x-tenant: t{i}"]
            out.append(
                mapping(f"header-{i:05d}", ['hostname: "*"', f"prefix: /svc-{i:05d}/h/", *headers, svc])
            )
        else:
            out.append(
                mapping(
                    f"regex-{i:05d}",
                    ['hostname: "*"', "prefix_regex: true", f'prefix: "/re-{i:05d}/[a-z0-9]+/.*"', svc],
                )
            )
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
