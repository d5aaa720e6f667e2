"""Run the model on OpenCL and compare it with the CPU backend: python backends/opencl/check.py [--model PATH] [--dtype float32]
The work is done by backends/cpu/check.py; see its docstring for what passes."""
import pathlib, runpy, sys

checker = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "cpu" / "check.py"), run_name="checker")
if __name__ == "__main__": sys.exit(checker["main"]("opencl"))
