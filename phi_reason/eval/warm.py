"""Imported once by the grading forkserver so every forked worker starts with the LaTeX parser
loaded and its ANTLR tables built (otherwise the first item of each worker would spend ~1 s of its
deadline importing)."""
from phi_reason.eval.single import grade_in_process

grade_in_process(r"\boxed{\frac{1}{2}+\sqrt{2}x}", r"\frac{\sqrt{2}}{1}x+0.5")
