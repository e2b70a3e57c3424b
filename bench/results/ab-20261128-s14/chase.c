#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc,char**argv){ size_t n=atol(argv[1])/sizeof(size_t); size_t*a=malloc(n*sizeof(size_t));
 for(size_t i=0;i<n;i++)a[i]=i; srand(1); for(size_t i=n-1;i>0;i--){size_t j=((size_t)rand()*RAND_MAX+rand())%i; size_t t=a[i];a[i]=a[j];a[j]=t;}
 struct timespec t0,t1; size_t p=0; long steps=20000000; clock_gettime(CLOCK_MONOTONIC,&t0);
 for(long s=0;s<steps;s++)p=a[p]; clock_gettime(CLOCK_MONOTONIC,&t1);
 printf("%zu MB: %.1f ns/access (%zu)\n", atol(argv[1])>>20, ((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/steps, p); }
