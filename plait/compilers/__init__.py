"""plait.compilers"""
