// Validates ServiceMonitor objects (a JSON list on stdin) with the models
// @kubernetes-models/prometheus-operator generates from prometheus-operator's Go types:
// field types, required fields, enums. Prints one JSON answer per object, in order.
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const answers = JSON.parse(input).map((object) => {
  try {
    new ServiceMonitor(object).validate();
    return { ok: true };
  } catch (error) {
    return { ok: false, error: String(error.message) };
  }
});
console.log(JSON.stringify(answers));
