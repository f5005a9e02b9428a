// The gradient collector as a Python module (collector.h).
#include "collector.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fused_accum::collector::Collector;
  using fused_accum::collector::SlotHook;
  m.doc() = "fused_accum's gradient collector: C++ post-accumulate-grad hooks that queue gradients";
  py::class_<SlotHook>(m, "SlotHook")
      .def("__call__", [](const SlotHook& hook, const at::Tensor& param) { hook(param); },
           py::arg("param"));
  py::class_<Collector, std::shared_ptr<Collector>>(m, "Collector")
      .def(py::init<py::object, py::object, int64_t, py::object>(), py::arg("on_start"),
           py::arg("on_full"), py::arg("bound"), py::arg("on_hand_set") = py::none())
      .def("guard", &Collector::guard, py::arg("param"), py::arg("slot"))
      .def("unguard", &Collector::unguard, py::arg("param"), py::arg("position"))
      .def("hook", &Collector::hook, py::arg("slot"), py::arg("bucket"), py::arg("index"))
      .def("add", &Collector::add, py::arg("param"), py::arg("slot"), py::arg("bucket"),
           py::arg("index"))
      .def("remove", &Collector::remove, py::arg("slot"))
      .def("take", &Collector::take, py::arg("task"))
      .def("forget", &Collector::forget, py::arg("task"))
      .def("plan", &Collector::plan, py::arg("task"), py::arg("entries"))
      .def("flush", &Collector::flush, py::arg("task"), py::arg("final"))
      .def("launches", &Collector::launches)
      .def("added_slots", &Collector::added_slots)
      .def("clear_added", &Collector::clear_added)
      .def("set_bound", &Collector::set_bound, py::arg("bound"))
      .def("set_on_each", &Collector::set_on_each, py::arg("on_each"))
      .def("queued_bytes", &Collector::queued_bytes);
}
