// Validate KEDA ScaledObjects (a JSON array on stdin) with the schema that
// @kubernetes-models/keda generated from KEDA's CRD: types, enums and required fields.
// Installed next to its node_modules by deploy/tools/install.sh; exit 1 on any finding.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const objects = JSON.parse(readFileSync(0, "utf8"));
let findings = 0;
for (const object of objects) {
  try {
    new ScaledObject(object).validate();
  } catch (error) {
    findings += 1;
    console.log(`${object.metadata?.name}: ${error.message}`);
  }
}
process.exit(findings ? 1 : 0);
